"""`internlm-jax bench long`: long-prompt prefill on the engine (chunked, over the paged cache) at several
lengths, each in a fresh process so its peak RSS is its own.

Default: the tiny preset with max_position_embeddings 1024 and dynamic NTK x2, so 4K..200K tokens are real
extrapolation (4x..195x the trained context). Per length: prefill tok/s, time to first token (the whole
prefill plus the first sampled token), peak RSS, and the prefill rate relative to the shortest length
(attention grows with the context, nothing else should). `--transformers` adds the TTFT of transformers'
Llama of the same shape (random weights, dynamic rope) at lengths up to `--hf-max` for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any


def _one(length: int, chunk: int, preset: str, max_pos: int, kv_int8: bool) -> dict[str, Any]:
    import numpy as np

    import internlm_jax as ij
    from internlm_jax.engine import Engine, EngineConfig, SamplingParams

    lm = ij.init(preset, seed=0, max_position_embeddings=max_pos, rope_scaling=("dynamic", 2.0),
                 max_context=length + 64)
    page = 64
    ec = EngineConfig(page_size=page, num_pages=-(-(length + 64) // page) + 1, max_num_seqs=1,
                      max_model_len=length + 64, max_num_batched_tokens=chunk, max_prefill_rows=1,
                      kv_dtype="int8" if kv_int8 else "auto", decode_batch_buckets=(1,), prefill_batch_buckets=(1,),
                      chunk_buckets=(chunk,), width_buckets=(-(-(length + 64) // page),))
    eng = Engine(lm.params, lm.config, ec)  # warm-up compiles the (1, chunk) and (1, 1) steps
    prompt = [1] + [int(t) for t in np.random.default_rng(0).integers(3, lm.config.vocab_size, length - 1)]
    t0 = time.perf_counter()
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    ttft = time.perf_counter() - t0
    assert len(out[0].outputs[0].token_ids) == 1
    return {"tokens": length, "ttft_s": ttft, "prefill_tok_s": length / ttft,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "warmup_s": eng.warmup_seconds}


def _hf_ttft(length: int, preset: str, max_pos: int) -> float | None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    from internlm_jax.config import get_preset

    c = get_preset(preset)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=max_pos, rope_theta=c.rope_theta,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}, tie_word_embeddings=False)).eval()
    ids = torch.randint(3, c.vocab_size, (1, length))
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="internlm-jax bench long", description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,32768,131072,200000")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (the engine's token budget)")
    ap.add_argument("--preset", default="internlm2-tiny")
    ap.add_argument("--max-pos", type=int, default=1024, help="max_position_embeddings of the model")
    ap.add_argument("--kv-int8", action="store_true")
    ap.add_argument("--transformers", action="store_true", help="also time transformers' prefill (<= --hf-max)")
    ap.add_argument("--hf-max", type=int, default=32768)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_one(args.child, args.chunk, args.preset, args.max_pos, args.kv_int8)))
        return 0
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        print(f"[bench long] {n} tokens ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "internlm_jax.bench_long", "--child", str(n), "--chunk", str(args.chunk),
               "--preset", args.preset, "--max-pos", str(args.max_pos)] + (["--kv-int8"] if args.kv_int8 else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        if args.transformers and n <= args.hf_max:
            row["hf_ttft_s"] = _hf_ttft(n, args.preset, args.max_pos)
        rows.append(row)
    base = rows[0]["prefill_tok_s"]
    print(f"| tokens | x trained | TTFT s | prefill tok/s | vs {rows[0]['tokens']} | peak RSS MB | transformers TTFT s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        hf = r.get("hf_ttft_s")
        print(f"| {r['tokens']} | {r['tokens'] / (2 * args.max_pos):.0f} | {r['ttft_s']:.1f} | {r['prefill_tok_s']:.0f} | "
              f"{r['prefill_tok_s'] / base:.2f} | {r['peak_rss_mb']:.0f} | {'-' if hf is None else f'{hf:.1f}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
