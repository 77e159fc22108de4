"""`internlm-jax demo`: the whole chain on a laptop CPU, from data to application: about 5 minutes on a quiet
2-core machine, more on a busy one (each stage shows its progress; timings.json records them; a rerun is
faster, compiled programs come from the persistent compilation cache).

data -> sentencepiece tokenizer with the InternLM2 special tokens -> pre-train a tiny InternLM2 -> LoRA SFT on
chat and tool-use dialogues -> evaluate before/after on held-out prompts -> int4 (AWQ) -> serve over
OpenAI-compatible HTTP -> a chat request and a tool-calling request -> clean shutdown. Every artifact goes under
one output folder, printed at the end with the commands to serve or chat with the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).with_name("assets") / "sft"
# internlm2-tiny widened a little: still seconds per hundred steps on a laptop CPU, but enough capacity to learn
# the held-out tasks from a few hundred SFT steps.
MODEL = {"name": "internlm2-tiny", "overrides": {"dtype": "float32", "hidden_size": 128, "num_layers": 4,
                                                 "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
                                                 "intermediate_size": 384}}
SETTINGS = {  # steps per stage; `--quick` is for CI smoke runs
    "full": {"docs": 3000, "pretrain_steps": 300, "sft_steps": 400, "eval_items": 40},
    "quick": {"docs": 600, "pretrain_steps": 30, "sft_steps": 30, "eval_items": 8},
}


MARKER = ".internlm-jax-demo"  # written into the output folder: only a folder holding it is ever cleared
# What the demo writes under --out; a rerun removes exactly these (never the folder, never anything else).
ARTIFACTS = ("data", "tokenizer", "pretrain", "sft", "int4", "server.log", "eval.md", "eval.json",
             "int4_report.json", "answers.json", "timings.json")


def prepare_out(out: Path) -> None:
    """Make `out` ready for a run: create it, or clear a previous demo's artifacts from it. A folder that
    holds anything else and no demo marker is refused (ConfigError) rather than wiped."""
    from internlm_jax.config import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ConfigError(f"--out {out} exists and is not empty (and was not written by the demo); nothing "
                              "was changed. Give a new or empty folder, e.g. --out runs/demo2")
        for name in ARTIFACTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `internlm-jax demo`; a rerun with this --out replaces the demo's "
                              "artifacts here: " + ", ".join(ARTIFACTS) + "\n")


def _log(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _as_messages(rec: dict[str, Any]) -> dict[str, Any]:
    """XTuner `conversation` records -> OpenAI messages (the other asset files already are)."""
    if "messages" in rec:
        return rec
    msgs = []
    for turn in rec["conversation"]:
        if turn.get("system"):
            msgs.append({"role": "system", "content": turn["system"]})
        msgs += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    return {"messages": msgs}


# ---- stages ---------------------------------------------------------------------------------------------------
def make_data(out: Path, docs: int) -> tuple[Path, Path]:
    """The pre-training corpus (synthetic facts) and a tokenizer trained on it plus the SFT dialogues."""
    from internlm_jax.chat import render
    from internlm_jax.data.corpus import write_synthetic_corpus
    from internlm_jax.tokenizer_train import train_tokenizer

    corpus = Path(write_synthetic_corpus(str(out / "data"), docs, 0))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    for name in ("unit_conversion", "arithmetic", "tool_use"):
        for rec in _read_jsonl(ASSETS / f"{name}.jsonl"):
            rec = _as_messages(rec)
            texts.append(render(rec["messages"], tools=rec.get("tools"), add_generation_prompt=False))
    tok_dir = Path(train_tokenizer(texts, out / "tokenizer", vocab_size=1024))
    return corpus, tok_dir


def pretrain(out: Path, corpus: Path, tok_dir: Path, steps: int) -> Any:
    from internlm_jax.runconfig import from_dict
    from internlm_jax.train.config import TrainConfig
    from internlm_jax.train.loop import train

    cfg = from_dict(TrainConfig, {
        "model": MODEL,
        "steps": steps, "output_dir": str(out / "pretrain"), "seed": 0, "global_batch_size": 16,
        "checkpoint_every": steps, "keep_checkpoints": 1, "tensorboard": False,
        "data": {"sources": [{"path": str(corpus), "format": "jsonl"}], "tokenizer": str(tok_dir), "seq_len": 128},
        "optimizer": {"lr": 3e-3, "warmup_steps": max(1, steps // 15), "schedule": "cosine", "weight_decay": 0.01},
    })
    return train(cfg)


def finetune_lora(out: Path, base_hf: Path, tok_dir: Path, steps: int) -> Any:
    from internlm_jax.runconfig import from_dict
    from internlm_jax.train.finetune import finetune
    from internlm_jax.train.finetune_config import FinetuneConfig

    cfg = from_dict(FinetuneConfig, {
        "model": MODEL,
        "init_from": str(base_hf), "mode": "lora", "task": "sft", "steps": steps,
        "output_dir": str(out / "sft"), "global_batch_size": 8, "checkpoint_every": steps, "keep_checkpoints": 1,
        "tensorboard": False,
        "dataset": {"sources": [str(ASSETS / f"{n}.jsonl") for n in ("unit_conversion", "arithmetic", "tool_use")],
                    "tokenizer": str(tok_dir), "seq_len": 256},
        "lora": {"rank": 32, "alpha": 64, "targets": ["wqkv", "wo", "w1", "w2", "w3"]},
        "optimizer": {"lr": 3e-3, "warmup_steps": max(1, steps // 10), "schedule": "cosine", "weight_decay": 0.0,
                      "b2": 0.999},
        "export": {"hf_dir": str(out / "sft" / "hf"), "adapter_format": "peft"},
    })
    return finetune(cfg)


def tool_call_accuracy(lm: Any, records: list[dict[str, Any]]) -> tuple[float, list[str]]:
    """Fraction of held-out tool dialogues where the first assistant turn is exactly the expected call."""
    from internlm_jax.chat import encode_chat, parse_completion

    prompts, want = [], []
    for r in records:
        msgs = r["messages"]
        k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(encode_chat(lm.tokenizer, msgs[:k], tools=r.get("tools")))
        call = msgs[k]["tool_calls"][0]["function"]
        want.append((call["name"], json.loads(call["arguments"])))
    stops = [lm.tokenizer.im_end_id, lm.tokenizer.action_end_id]
    outs = lm.generate(prompts, 40, stop_token_ids=stops, return_details=True)
    hits, texts = 0, []
    for g, (name, args) in zip(outs, want):
        text = lm.tokenizer.decode(g.token_ids)
        if "<|action_start|>" in text and "<|action_end|>" not in text:
            text += "<|action_end|>"  # generation stopped on the stop token, which is not returned
        texts.append(text)
        _, calls = parse_completion(text)
        if calls and calls[0]["function"]["name"] == name and json.loads(calls[0]["function"]["arguments"]) == args:
            hits += 1
    return hits / max(len(records), 1), texts


def evaluate(lm: Any, n: int) -> dict[str, float]:
    from internlm_jax.train.finetune import chat_accuracy

    scores = {}
    for name in ("unit_conversion", "arithmetic"):
        recs = [_as_messages(r) for r in _read_jsonl(ASSETS / f"{name}_heldout.jsonl")[:n]]
        scores[name], _ = chat_accuracy(lm.params, lm.config, lm.tokenizer, recs, max_new_tokens=16)
    scores["tool_call"], _ = tool_call_accuracy(lm, _read_jsonl(ASSETS / "tool_use_heldout.jsonl")[:n])
    return scores


def quantize(out: Path, lm: Any, tok_dir: Path, corpus: Path) -> tuple[Path, dict[str, Any]]:
    """int4 AWQ (group 32 fits the tiny widths) calibrated on corpus text; perplexity and greedy agreement."""
    import numpy as np

    from internlm_jax.api import LM
    from internlm_jax.quant.int4 import quantize_params
    from internlm_jax.quant.io import save_quantized
    from internlm_jax.quant.report import accuracy_report

    lines = [json.loads(x)["text"] for x in corpus.read_text().splitlines()[-64:]]
    ids = [lm.tokenizer.encode(t) for t in lines]
    calib = np.asarray([i[:48] for i in ids[:16] if len(i) >= 48], np.int32)  # [rows, 48] calibration tokens
    qparams = quantize_params(lm.params, lm.config, group_size=32, method="awq", calib_batches=calib)
    qlm = LM(lm.config, qparams, lm.tokenizer)
    held = [i[:96] for i in ids[16:48]]
    report = accuracy_report(lm, qlm, held)
    path = out / "int4"
    save_quantized(str(path), qparams, lm.config)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, path / name)
    return path, report


# The demo's server handles one request at a time: a few slots and small buckets keep its warm-up to a handful of
# compiled programs (the defaults, sized for many concurrent users, compile ~40).
SERVE_ENGINE = ["--max-batch", "2", "--max-context", "512", "--no-warmup-scoring",  # it sends no echo+logprobs
                "--engine-buckets", "decode=1,2;prefill=1;chunks=64,512;widths=8"]


def _echo_progress(log_path: Path, shown: int) -> int:
    """Print the server log's warm-up and ready lines written since line `shown`; returns the new count."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return shown
    for line in lines[shown:]:
        if "warm-up" in line or "engine ready" in line or "serving" in line:
            print("  server: " + line.split(": ", 1)[-1], flush=True)
    return len(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(out: Path, model_dir: Path, tok_dir: Path) -> dict[str, Any]:
    """Start `internlm-jax serve` on loopback, send a chat and a tool-calling request, stop it."""
    import httpx

    port = _free_port()
    log_path = out / "server.log"
    cmd = [sys.executable, "-m", "internlm_jax.cli", "serve", "--model", str(model_dir), "--tokenizer",
           str(tok_dir), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "demo",
           *SERVE_ENGINE]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {"command": " ".join(cmd)}
    t0 = time.time()
    shown = 0
    try:
        deadline = time.time() + 300
        while True:
            shown = _echo_progress(log_path, shown)
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited early (code {proc.returncode}); see {log_path}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the server did not become healthy in 300 s; see {log_path}")
            time.sleep(1)
        _echo_progress(log_path, shown)
        results["seconds_to_ready"] = round(time.time() - t0, 1)
        print(f"server ready in {results['seconds_to_ready']:.0f} s", flush=True)
        system = "You are a precise assistant. Answer with the result only."
        chat = {"model": "demo", "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": "Convert 46 km to m."}]}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120)
        r.raise_for_status()
        results["chat"] = {"request": chat["messages"][-1]["content"],
                           "answer": r.json()["choices"][0]["message"]["content"]}
        tools = json.loads((ASSETS / "tool_use.jsonl").read_text().splitlines()[0])["tools"]
        tool_req = {"model": "demo", "temperature": 0, "max_tokens": 40, "tools": tools,
                    "messages": [{"role": "user", "content": "What is the temperature in Lima?"}]}
        r = httpx.post(f"{base}/v1/chat/completions", json=tool_req, timeout=120)
        r.raise_for_status()
        msg = r.json()["choices"][0]["message"]
        results["tool"] = {"request": tool_req["messages"][-1]["content"], "content": msg.get("content"),
                           "tool_calls": msg.get("tool_calls")}
        if msg.get("tool_calls"):  # answer the call with a made-up reading and ask for the final answer
            call = msg["tool_calls"][0]
            follow = dict(tool_req, messages=tool_req["messages"] + [
                {"role": "assistant", "content": msg.get("content") or "", "tool_calls": msg["tool_calls"]},
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 21})}])
            r = httpx.post(f"{base}/v1/chat/completions", json=follow, timeout=120)
            r.raise_for_status()
            results["tool"]["final_answer"] = r.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: finish requests, stop the engine
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    results["server_exit_code"] = proc.returncode
    return results


# ---- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="internlm-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder for every artifact (new or empty, or an "
                   "earlier demo's: only the demo's own files there are replaced)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    p.add_argument("--no-serve", action="store_true", help="skip the HTTP server stage")
    args = p.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    out = Path(args.out).expanduser().resolve()
    from internlm_jax.config import ConfigError

    try:
        prepare_out(out)
    except ConfigError as e:
        print(f"internlm-jax demo: {e}", file=sys.stderr)
        return 2
    t_start = time.time()
    timings: dict[str, float] = {}
    # Compiled programs persist across runs (and are shared with `serve`/`chat`): a rerun compiles little.
    from argparse import Namespace

    from internlm_jax.serve.loading import compilation_cache_dir, enable_compilation_cache

    enable_compilation_cache(compilation_cache_dir(Namespace()))

    def stage(name: str):
        timings[name] = time.time()
        _log(name)

    import internlm_jax as ij
    from internlm_jax.checkpoint.hf import save_hf

    stage("1/6 data and tokenizer")
    corpus, tok_dir = make_data(out, s["docs"])
    print(f"corpus {corpus} ({s['docs']} documents); tokenizer {tok_dir} (1024 pieces, InternLM2 special tokens)")

    stage("2/6 pre-train a tiny InternLM2")
    result = pretrain(out, corpus, tok_dir, s["pretrain_steps"])
    base_hf = out / "pretrain" / "hf"
    save_hf(str(base_hf), result.state["params"], result.model_config, tokenizer_dir=str(tok_dir), progress=False)
    base = ij.load(str(base_hf))

    stage("3/6 evaluate the pre-trained model, LoRA fine-tune, evaluate again")
    before = evaluate(base, s["eval_items"])
    ft = finetune_lora(out, base_hf, tok_dir, s["sft_steps"])
    tuned = ij.load(ft.hf_dir)
    after = evaluate(tuned, s["eval_items"])
    table = ["| held-out task | pre-trained | after LoRA SFT |", "|---|---|---|"]
    table += [f"| {k} | {100 * before[k]:.1f}% | {100 * after[k]:.1f}% |" for k in before]
    (out / "eval.md").write_text("\n".join(table) + "\n")
    (out / "eval.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    print("\n".join(table))

    stage("4/6 quantize to int4 (AWQ)")
    qdir, report = quantize(out, tuned, tok_dir, corpus)
    (out / "int4_report.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"int4 checkpoint {qdir}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in report.items() if not isinstance(v, (list, dict))))

    answers: dict[str, Any] = {}
    if not args.no_serve:
        stage("5/6 serve over OpenAI-compatible HTTP and ask")
        answers = serve_and_ask(out, qdir, tok_dir)
        (out / "answers.json").write_text(json.dumps(answers, indent=2, ensure_ascii=False))
        print(json.dumps({k: v for k, v in answers.items() if k != "command"}, indent=2, ensure_ascii=False))

    stage("6/6 summary")
    names = list(timings)
    ends = [timings[n] for n in names[1:]] + [time.time()]
    for n, end in zip(names, ends):
        print(f"  {n:<60} {end - timings[n]:6.1f} s")
    (out / "timings.json").write_text(json.dumps({n: round(end - timings[n], 1) for n, end in zip(names, ends)},
                                                 indent=2))
    print(f"total {time.time() - t_start:.0f} s; everything is in {out}")
    print("  loss curves:  " + ", ".join(str(x) for x in sorted(out.glob("*/loss_curve.png"))))
    print(f"  serve it:     internlm-jax serve --model {qdir} --tokenizer {tok_dir}")
    print(f"  chat with it: internlm-jax chat --model {ft.hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
