"""`internlm-jax bench engine`: the engine against one-at-a-time and static batching (and transformers).

A fixed random workload (default 64 requests, prompts 32..512 tokens, outputs 16..128 tokens, greedy with
eos ignored so every system produces the same number of tokens, every request arriving at t=0, so TTFT
includes queueing) on random weights of each preset:
  (a) the Engine: every request submitted at t=0, continuous batching over the paged cache;
  (b) one request at a time on the dense KV cache (prefill + one call per token) - on the first
      `--alone-requests` requests, since it is the slow baseline (rates are per token, comparable);
  (c) static batching: batches of `--static-batch` in arrival order, each padded to its longest prompt and
      run until its longest output is done;
  (d) transformers' batched `generate` of 16 prompts on a Llama model of the same shape (when installed),
      against the engine on the same 16 prompts;
  (e) the floor: a plain jitted greedy loop (`engine.reference.greedy_loop`: prefill + device-side decode
      loop over the same forward, no host round trip per token) at batch 1 and 16, against the engine and
      the notebook API (`LM.generate`, which runs on an engine) on the same prompts.
Reported: output tok/s, req/s, TTFT and ITL P50/P90/P99; batch-1 decode memory bandwidth (bytes of weights
+ KV read per token x tokens/s) against the machine's measured copy bandwidth; engine output tok/s against
the compute roof (matmul peak / (2 x matmul params per token)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import get_preset
from internlm_jax.engine import Engine, EngineConfig, SamplingParams
from internlm_jax.engine.reference import DenseGenerator, greedy_loop
from internlm_jax.model import init_params


@dataclasses.dataclass
class Result:
    name: str
    requests: int
    output_tokens: int
    seconds: float
    ttft: list[float]
    itl: list[float]

    def row(self) -> dict[str, Any]:
        p = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")  # noqa: E731
        return {"system": self.name, "requests": self.requests, "output_tok_s": self.output_tokens / self.seconds,
                "req_s": self.requests / self.seconds, "seconds": self.seconds,
                **{f"ttft_p{q}_ms": p(self.ttft, q) for q in (50, 90, 99)},
                **{f"itl_p{q}_ms": p(self.itl, q) for q in (50, 90, 99)}}


# ---- machine limits -------------------------------------------------------------------------------
def measure_bandwidth(mbytes: int = 256) -> float:
    """Bytes/s of a large on-device copy (read + write), best of 5."""
    n = mbytes * (1 << 20) // 4
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)  # donated: no fresh (page-faulting) buffer per run
    box = [f(jnp.ones((n,), jnp.float32))]

    def once():
        box[0] = f(box[0])
        box[0].block_until_ready()
    once()
    best = min(_timed(once) for _ in range(5))
    return 2 * n * 4 / best


def measure_matmul_peak(n: int = 2048, dtype: str = "float32") -> float:
    """FLOP/s of an n x n matmul, best of 5."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- systems --------------------------------------------------------------------------------------
def run_engine(engine: Engine, prompts, news, name: str = "engine (continuous batching)") -> Result:
    engine.allocator.clear_cache()  # no prefix hits from an earlier run of the same prompts
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {}
    sink = lambda ev: times[ev.request_id].append(time.perf_counter())  # noqa: E731
    for p, n in zip(prompts, news):
        rid = engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), on_event=sink)
        times[rid] = []
    while engine.has_unfinished():
        engine.step()
    total = time.perf_counter() - t0
    ttft = [ts[0] - t0 for ts in times.values()]
    itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
    return Result(name, len(prompts), sum(news), total, ttft, itl)


def run_alone(gen: DenseGenerator, prompts, news) -> Result:
    ttft, itl = [], []
    t0 = time.perf_counter()
    for p, n in zip(prompts, news):
        stamps: list[float] = []
        gen.generate([p], n, on_token=lambda _: stamps.append(time.perf_counter()))
        ttft.append(stamps[0] - t0)  # every request arrived at t0 and waited for those before it
        itl += [b - a for a, b in zip(stamps, stamps[1:])]
    return Result("one at a time (dense cache)", len(prompts), sum(news), time.perf_counter() - t0, ttft, itl)


def run_static(gen: DenseGenerator, prompts, news) -> Result:
    ttft, itl = [], []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), gen.batch):
        ps, ns = prompts[i:i + gen.batch], news[i:i + gen.batch]
        stamps: list[float] = []
        gen.generate(ps, max(ns), on_token=lambda _: stamps.append(time.perf_counter()))
        for n in ns:  # a request's tokens are the first n of the batch's steps
            ttft.append(stamps[0] - t0)
            itl += [b - a for a, b in zip(stamps[:n], stamps[1:n])]
    return Result(f"static batching (batch {gen.batch})", len(prompts), sum(news), time.perf_counter() - t0, ttft,
                  itl)


def run_floor(params, config, engine: Engine, prompts, new: int) -> list[dict[str, Any]]:
    """Decode tok/s at batch 1 and 16 of the plain jitted loop, the engine and LM.generate, same prompts."""
    from internlm_jax.api import LM

    lm = LM(config, params)
    rows = []
    for b in (1, 16):
        ps = prompts[:b]
        greedy_loop(params, config, ps, new)  # compile
        loop_s = _timed(lambda: greedy_loop(params, config, ps, new))
        eng = run_engine(engine, ps, [new] * b, name=f"engine b{b}")
        lm.generate(ps, new, ignore_eos=True)  # compile the notebook engine's buckets
        nb_s = _timed(lambda: lm.generate(ps, new, ignore_eos=True))
        rows.append({"batch": b, "loop_tok_s": b * new / loop_s, "engine_tok_s": b * new / eng.seconds,
                     "notebook_tok_s": b * new / nb_s})
    return rows


def run_transformers(config, prompts, max_new: int) -> Result | None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                     head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
                     max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        model.generate(input_ids=ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                       do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    return Result(f"transformers generate (batch {len(prompts)})", len(prompts), len(prompts) * max_new, total, [], [])


# ---- one preset -----------------------------------------------------------------------------------
def matmul_params(config) -> int:
    """Weights multiplied per token: every linear layer incl. the output head (the embedding is a lookup)."""
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    K, G, H = config.num_kv_heads, config.groups, config.head_dim
    return L * (D * K * (G + 2) * H + K * G * H * D + 3 * D * F) + D * V


def bench_preset(preset: str, args, machine: dict[str, float]) -> dict[str, Any]:
    config = get_preset(preset, dtype=args.dtype, param_dtype=args.dtype)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(args.seed)
    prompts = [[int(t) for t in rng.integers(3, config.vocab_size, int(rng.integers(args.prompt_min,
                                                                                      args.prompt_max + 1)))]
               for _ in range(args.requests)]
    news = [int(rng.integers(args.out_min, args.out_max + 1)) for _ in range(args.requests)]
    max_len = args.prompt_max + args.out_max
    ps = args.page_size
    pages = -(-max_len // ps)
    ec = EngineConfig(page_size=ps, max_num_seqs=args.slots, max_model_len=max_len,
                      max_num_batched_tokens=args.token_budget, chunk_size=args.token_budget,
                      max_prefill_rows=4, kv_cache_tokens=args.slots * pages * ps,
                      decode_batch_buckets=tuple(sorted({1, max(1, args.slots // 4), args.slots})),
                      prefill_batch_buckets=(1, 2, 4), chunk_buckets=(args.token_budget // 4, args.token_budget),
                      width_buckets=tuple(sorted({max(1, pages // 3), pages})))
    print(f"[{preset}] warm-up ...", file=sys.stderr, flush=True)
    engine = Engine(params, config, ec)
    out: dict[str, Any] = {"preset": preset, "params": config.num_params(), "matmul_params": matmul_params(config),
                           "warmup_s": engine.warmup_seconds, "warmup_compiles": engine.stats()["warmup_compilations"]}
    rows = []
    print(f"[{preset}] (a) engine on {args.requests} requests ...", file=sys.stderr, flush=True)
    res_engine = run_engine(engine, prompts, news)
    rows.append(res_engine.row())
    st = engine.stats()
    out["engine_stats"] = {k: st[k] for k in ("compilations", "preemptions", "steps", "prefill_tokens",
                                              "decode_tokens", "prefix_hit_rate")}

    gen1 = DenseGenerator(params, config, 1, args.prompt_max, args.out_max)
    n_alone = min(args.alone_requests, args.requests)
    gen1.warmup([len(p) for p in prompts[:n_alone]])
    print(f"[{preset}] (b) one at a time on {n_alone} requests ...", file=sys.stderr, flush=True)
    res_alone = run_alone(gen1, prompts[:n_alone], news[:n_alone])
    rows.append(res_alone.row())

    genb = DenseGenerator(params, config, args.static_batch, args.prompt_max, args.out_max)
    genb.warmup([len(p) for p in prompts])
    print(f"[{preset}] (c) static batching ...", file=sys.stderr, flush=True)
    rows.append(run_static(genb, prompts, news).row())

    # batch-1 decode: engine and dense loop, bytes read per token = weights + the KV of the context so far
    one = run_engine(engine, prompts[:1], [args.out_max], name="engine batch-1")
    itl_engine = float(np.median(one.itl))
    itl_dense = float(np.median(res_alone.itl))
    itemsize = jnp.dtype(config.dtype).itemsize
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) - \
        params["embed"].size * itemsize + config.hidden_size * itemsize  # one embedding row is read, not all
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
    ctx = len(prompts[0]) + args.out_max / 2
    bytes_tok = weight_bytes + kv_per_token * ctx
    out["batch1_decode"] = {
        "bytes_per_token": bytes_tok, "engine_itl_ms": itl_engine * 1e3, "dense_itl_ms": itl_dense * 1e3,
        "engine_GBps": bytes_tok / itl_engine / 1e9, "dense_GBps": bytes_tok / itl_dense / 1e9,
        "machine_GBps": machine["bandwidth"] / 1e9,
        "engine_fraction": bytes_tok / itl_engine / machine["bandwidth"],
        "dense_fraction": bytes_tok / itl_dense / machine["bandwidth"]}
    roof = machine["matmul_flops"] / (2 * matmul_params(config))
    out["compute_roof_tok_s"] = roof
    out["engine_fraction_of_roof"] = res_engine.output_tokens / res_engine.seconds / roof
    # All matmul work the engine did: every fed token through the layers, one output-head row per sampled
    # token (prefill chunks only project their last token). Attention score FLOPs are left out.
    head = config.hidden_size * config.vocab_size
    flops = 2 * ((st["prefill_tokens"] + st["decode_tokens"]) * (matmul_params(config) - head)
                 + res_engine.output_tokens * head)
    out["engine_matmul_utilisation"] = flops / res_engine.seconds / machine["matmul_flops"]
    out["engine_vs_alone"] = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
    out["engine_vs_static"] = rows[0]["output_tok_s"] / rows[2]["output_tok_s"]

    out["floor"] = run_floor(params, config, engine, prompts, args.hf_new_tokens)

    if not args.no_transformers:
        print(f"[{preset}] (d) transformers batched generate ...", file=sys.stderr, flush=True)
        hf = run_transformers(config, prompts[:16], args.hf_new_tokens)
        if hf is not None:
            mine = run_engine(engine, prompts[:16], [args.hf_new_tokens] * 16, name="engine (same 16 prompts)")
            rows += [hf.row(), mine.row()]
            out["engine_vs_transformers"] = rows[-1]["output_tok_s"] / rows[-2]["output_tok_s"]
    out["rows"] = rows
    out["compilations_after_warmup"] = engine.stats()["compilations"]
    return out


def format_report(machine: dict[str, float], results: Sequence[dict[str, Any]]) -> str:
    lines = [f"machine: {jax.default_backend()} x{jax.device_count()}, copy bandwidth "
             f"{machine['bandwidth'] / 1e9:.1f} GB/s, matmul peak {machine['matmul_flops'] / 1e9:.1f} GFLOP/s"]
    for r in results:
        lines.append("")
        lines.append(f"## {r['preset']} ({r['params'] / 1e6:.1f}M params; warm-up {r['warmup_s']:.1f} s, "
                     f"{r['warmup_compiles']} compiles; compilations after warm-up: {r['compilations_after_warmup']})")
        lines.append("| system | req | out tok/s | req/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms |")
        lines.append("|---|---|---|---|---|---|")
        for row in r["rows"]:
            lines.append(f"| {row['system']} | {row['requests']} | {row['output_tok_s']:.1f} | {row['req_s']:.2f} | "
                         f"{row['ttft_p50_ms']:.0f}/{row['ttft_p90_ms']:.0f}/{row['ttft_p99_ms']:.0f} | "
                         f"{row['itl_p50_ms']:.1f}/{row['itl_p90_ms']:.1f}/{row['itl_p99_ms']:.1f} |")
        b = r["batch1_decode"]
        lines.append(f"batch-1 decode: {b['bytes_per_token'] / 1e6:.1f} MB/token; engine {b['engine_itl_ms']:.2f} ms/token"
                     f" = {b['engine_GBps']:.1f} GB/s ({b['engine_fraction']:.0%} of measured); dense loop "
                     f"{b['dense_itl_ms']:.2f} ms/token = {b['dense_GBps']:.1f} GB/s ({b['dense_fraction']:.0%})")
        lines.append(f"compute roof {r['compute_roof_tok_s']:.0f} tok/s; engine at {r['engine_fraction_of_roof']:.1%} "
                     f"(all its matmul work incl. prefill: {r['engine_matmul_utilisation']:.0%} of the matmul peak);"
                     f" engine/one-at-a-time {r['engine_vs_alone']:.1f}x; engine/static {r['engine_vs_static']:.1f}x"
                     + (f"; engine/transformers {r['engine_vs_transformers']:.1f}x" if "engine_vs_transformers" in r
                        else ""))
        for f in r["floor"]:
            lines.append(f"floor b{f['batch']}: plain jitted loop {f['loop_tok_s']:.1f} tok/s; engine "
                         f"{f['engine_tok_s']:.1f} ({f['engine_tok_s'] / f['loop_tok_s']:.2f}x); notebook generate "
                         f"{f['notebook_tok_s']:.1f} ({f['notebook_tok_s'] / f['loop_tok_s']:.2f}x)")
        lines.append(f"engine: {r['engine_stats']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="internlm-jax bench engine", description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="internlm2-tiny,internlm2-100m")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--out-min", type=int, default=16)
    ap.add_argument("--out-max", type=int, default=128)
    ap.add_argument("--alone-requests", type=int, default=16, help="requests for the one-at-a-time baseline")
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--hf-new-tokens", type=int, default=64)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--dtype", default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.prompt_min < 1 or args.prompt_max < args.prompt_min or args.out_max < args.out_min or args.out_min < 1:
        ap.error("need 1 <= prompt-min <= prompt-max and 1 <= out-min <= out-max")
    machine = {"bandwidth": measure_bandwidth(), "matmul_flops": measure_matmul_peak(dtype=args.dtype)}
    results = [bench_preset(p.strip(), args, machine) for p in args.presets.split(",") if p.strip()]
    print(format_report(machine, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
