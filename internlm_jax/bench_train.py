"""Train-step benchmark: tokens/s and MFU of the tiny and a ~100M InternLM2 config on this machine.

    python tools/bench_train.py                       # tiny + 100m, remat off/on, torch baseline
    python tools/bench_train.py --models tiny --no-torch
    python tools/bench_train.py --models 100m --breakdown   # where the time goes: fwd / fwd+bwd / full step

Everything is measured in one run, in this order: the fp32 matmul FLOP/s of the machine (best of a few square
matmul sizes), then each JAX train step (AdamW, fp32, synthetic packed batches, one device), then -- when torch
and transformers are installed -- the same-shape transformers LlamaForCausalLM train step (forward, backward,
AdamW step) in fp32. MFU = model FLOPs per token (internlm_jax.train.flops: 6 * matmul params + 12 * L * N * H
* T, attention included, remat recompute not counted) x tokens/s / measured matmul FLOP/s.

The ~100M config is the `internlm2-100m` preset: D=768, L=12, N=12, K=4, H=64, F=2048, V=32000, 512-token rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

from internlm_jax.config import ModelConfig, get_preset
from internlm_jax.model import init_params, param_axes
from internlm_jax.sharding import MeshConfig, make_mesh
from internlm_jax.train.config import OptimizerConfig
from internlm_jax.train.flops import matmul_params, measure_matmul_flops, train_flops_per_token
from internlm_jax.train.optimizer import build_optimizer, trainable_mask
from internlm_jax.train.step import abstract_state, init_state, lm_loss, make_step_fns, put_batch
from internlm_jax.train.synthetic import SyntheticBatches

SHAPES = {  # name -> (preset, rows per step, row length, timed steps)
    "tiny": ("internlm2-tiny", 16, 128, 10),
    "100m": ("internlm2-100m", 2, 512, 3),
}


@dataclasses.dataclass
class Row:
    name: str
    impl: str
    remat: str
    params_m: float
    tokens: int
    step_s: float
    tok_s: float
    mfu: float
    note: str = ""


def measure_peak() -> tuple[float, str]:
    best, where = 0.0, ""
    for n in (512, 1024, 2048):
        f = measure_matmul_flops("float32", n=n, reps=5)
        if f > best:
            best, where = f, f"n={n}"
    return best, where


def _time_steps(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_jax(name: str, cfg: ModelConfig, rows: int, seq: int, steps: int, peak: float) -> Row:
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx, schedule = build_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
    init = lambda k: init_params(cfg, k)
    abstract, mask = abstract_state(cfg, tx, lambda p: trainable_mask(p, None), init)
    fns = make_step_fns(cfg, tx, schedule, mesh, abstract, param_axes(cfg), mask)
    state = jax.jit(lambda k: init_state(init(k), tx, mask), out_shardings=fns.shardings)(jax.random.key(0))
    batch = put_batch(next(SyntheticBatches(cfg.vocab_size, seq, rows, seed=0)), fns.batch_sharding)
    t = time.perf_counter()
    state, m = fns.train(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def one() -> None:
        holder["state"], metrics = fns.train(holder["state"], batch)
        jax.block_until_ready(metrics)

    one()  # second call: no compile, caches warm
    step_s = _time_steps(one, steps)
    tokens = rows * seq
    tok_s = tokens / step_s
    mfu = train_flops_per_token(cfg, seq) * tok_s / peak
    return Row(name, "internlm-jax", cfg.remat, cfg.num_params() / 1e6, tokens, step_s, tok_s, mfu,
               f"compile {compile_s:.1f}s")


def breakdown(cfg: ModelConfig, rows: int, seq: int, steps: int) -> list[tuple[str, float]]:
    """Median seconds of forward+loss, forward+backward, and the full train step (AdamW included)."""
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    batch = {k: jax.numpy.asarray(v) for k, v in next(SyntheticBatches(cfg.vocab_size, seq, rows, seed=0)).items()}
    loss = jax.jit(lambda p, b: lm_loss(p, b, cfg)[0])
    grad = jax.jit(jax.grad(lambda p, b: lm_loss(p, b, cfg)[0]))
    out = []
    for label, fn in (("forward + loss", loss), ("forward + backward", grad)):
        jax.block_until_ready(fn(params, batch))
        out.append((label, _time_steps(lambda: jax.block_until_ready(fn(params, batch)), steps)))  # noqa: B023
    return out


def bench_torch(name: str, cfg: ModelConfig, rows: int, seq: int, steps: int, peak: float) -> Row | None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    b = next(SyntheticBatches(cfg.vocab_size, seq, rows, seed=0))
    ids = torch.from_numpy(b["tokens"].astype(np.int64))
    labels = torch.from_numpy(np.where(b["loss_mask"] > 0, b["targets"], -100).astype(np.int64))

    def one() -> None:
        # Our targets are already the next tokens (targets[t] = tokens[t+1]), so the loss is taken without
        # transformers' internal shift. Attention is plain causal over the row (no per-document mask).
        out = model(input_ids=ids)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                                 ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    one()
    first = time.perf_counter() - t
    one()
    step_s = _time_steps(one, steps)
    tokens = rows * seq
    tok_s = tokens / step_s
    mfu = train_flops_per_token(cfg, seq) * tok_s / peak
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Row(name, f"torch {torch.__version__.split('+')[0]} Llama", "none", params, tokens, step_s, tok_s, mfu,
               f"first step {first:.1f}s, {torch.get_num_threads()} threads")


def print_table(rows: list[Row], peak: float, peak_note: str) -> None:
    print(f"\nmeasured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({peak_note}); "
          f"devices: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus")
    head = f"{'config':<6} {'impl':<26} {'remat':<6} {'params':>8} {'tok/step':>9} {'step s':>8} {'tok/s':>9} " \
           f"{'MFU':>6} {'vs torch':>9}  note"
    print(head)
    print("-" * len(head))
    torch_tok = {r.name: r.tok_s for r in rows if r.impl.startswith("torch")}
    for r in rows:
        ratio = f"{r.tok_s / torch_tok[r.name]:.2f}x" if r.name in torch_tok else "-"
        print(f"{r.name:<6} {r.impl:<26} {r.remat:<6} {r.params_m:>7.1f}M {r.tokens:>9} {r.step_s:>8.3f} "
              f"{r.tok_s:>9.0f} {100 * r.mfu:>5.1f}% {ratio:>9}  {r.note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="internlm-jax bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,100m", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--remat", default="none,full", help="remat policies to time (none, minimal, dots, full)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers Llama baseline")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default per model)")
    p.add_argument("--rows", type=int, default=None, help="rows per step (default per model)")
    p.add_argument("--breakdown", action="store_true", help="also time forward and forward+backward alone")
    args = p.parse_args(argv)

    peak, peak_note = measure_peak()
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s ({peak_note})", flush=True)
    rows: list[Row] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in SHAPES:
            print(f"unknown model {name!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        preset, n_rows, seq, steps = SHAPES[name]
        n_rows, steps = args.rows or n_rows, args.steps or steps
        base = get_preset(preset).replace(dtype="float32", param_dtype="float32", attention_impl="reference")
        print(f"{name}: {matmul_params(base) / 1e6:.1f}M matmul params, {train_flops_per_token(base, seq) / 1e6:.0f} "
              f"MFLOP/token at T={seq}", flush=True)
        for remat in [r.strip() for r in args.remat.split(",") if r.strip()]:
            row = bench_jax(name, base.replace(remat=remat), n_rows, seq, steps, peak)
            print(f"  jax remat={remat}: {row.tok_s:.0f} tok/s, MFU {100 * row.mfu:.1f}%", flush=True)
            rows.append(row)
        if args.breakdown:
            for label, secs in breakdown(base, n_rows, seq, steps):
                print(f"  {label:<20} {secs:.3f}s  ({n_rows * seq / secs:.0f} tok/s)", flush=True)
        if not args.no_torch:
            row = bench_torch(name, base, n_rows, seq, steps, peak)
            if row is None:
                print("  torch/transformers not installed: no baseline row", flush=True)
            else:
                print(f"  torch: {row.tok_s:.0f} tok/s, MFU {100 * row.mfu:.1f}%", flush=True)
                rows.append(row)
    print_table(rows, peak, peak_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
