"""Train-step benchmark: tokens/s and MFU of the tiny and a ~100M InternLM2 config against transformers.

    internlm-jax bench train                          # tiny + 100m, remat none, torch baseline, interleaved
    internlm-jax bench train --models 100m --rows 8 --remat none
    internlm-jax bench train --models 100m --breakdown      # where the time goes: head, fwd, fwd+bwd, optimizer
    internlm-jax bench train --head unfused                 # the pre-fusion output head (full logits), for A/B

The numbers guard themselves against a busy machine, where torch loses more than XLA and a matmul peak
measured under load inflates MFU:
- the 1-minute load average is read before and after, and the CPU time other processes took while each step
  was timed (from /proc/stat minus this process's own CPU time) is measured; a busy machine gets a warning;
- the pair (internlm-jax step, transformers step) is timed interleaved, round after round, until the last
  --min-rounds ratios agree within --tol (or --max-rounds); the table prints the median ratio and its spread;
- MFU divides by the matmul FLOP/s measured in the same run at the model's own weight-matmul shapes (x @ W,
  g @ W^T and x^T @ g for every weight, FLOP-weighted), re-measured every round, best seen (a load dip can
  lower the step rate and the peak together; the best peak of the run keeps MFU from being inflated).

MFU = model FLOPs per token (internlm_jax.train.flops: 6 * matmul params + 12 * L * N * H * T, attention
included, remat recompute not counted) x tokens/s / that peak. JAX and torch both run fp32 on the same
synthetic packed batches; the transformers model is LlamaForCausalLM of the same shape (AdamW, same betas).

The ~100M config is the `internlm2-100m` preset: D=768, L=12, N=12, K=4, H=64, F=2048, V=32000, 512-token rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import ModelConfig, get_preset
from internlm_jax.model import forward, init_params, param_axes
from internlm_jax.sharding import MeshConfig, make_mesh
from internlm_jax.train.config import OptimizerConfig
from internlm_jax.train.flops import matmul_params, measure_matmul_flops, train_flops_per_token
from internlm_jax.train.losses import output_ce_sums
from internlm_jax.train.optimizer import build_optimizer, trainable_mask
from internlm_jax.train.step import (
    abstract_state,
    default_loss_fn,
    init_state,
    lm_loss,
    make_step_fns,
    put_batch,
)
from internlm_jax.train.synthetic import SyntheticBatches

SHAPES = {  # name -> (preset, rows per step, row length, timed steps per round)
    "tiny": ("internlm2-tiny", 16, 128, 5),
    "100m": ("internlm2-100m", 2, 512, 1),
}
BUSY_FOREIGN = 0.10  # others' share of the CPUs while timing above which a round counts as busy
BUSY_LOAD_PER_CPU = 0.5  # 1-minute load average per CPU (before the run) above which the machine is busy


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
    cpu_s: float = 0.0
    ratio: float | None = None
    ratio_lo: float | None = None
    ratio_hi: float | None = None
    rounds: int = 0
    foreign: float = 0.0
    note: str = ""


# ---- load -------------------------------------------------------------------------------------------------
def _cpu_busy_s() -> float:
    """Seconds of CPU time all processes spent busy so far (all CPUs), from /proc/stat; 0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in parts]
    busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass
class Timing:
    wall: float
    cpu: float  # this process's CPU seconds
    foreign: float  # others' share of all CPUs during the timing (0..1)


def timed(fn: Callable[[], object]) -> Timing:
    b0, c0, t0 = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
    fn()
    wall, cpu, busy = time.perf_counter() - t0, _own_cpu_s() - c0, _cpu_busy_s() - b0
    ncpu = os.cpu_count() or 1
    return Timing(wall, cpu, max(0.0, min(1.0, (busy - cpu) / max(wall * ncpu, 1e-9))))


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ---- the peak at the model's own matmul shapes -------------------------------------------------------------
def weight_shapes(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(in, out, count per step) of every weight matmul: qkv, wo, w1, w3, w2 per layer, and the head."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    K, G, H, N = cfg.num_kv_heads, cfg.groups, cfg.head_dim, cfg.num_heads
    return [(D, K * (G + 2) * H, L), (N * H, D, L), (D, F, 2 * L), (F, D, L), (D, V, 1)]


class ShapePeak:
    """FLOP/s of the training matmuls of a model (x @ W, g @ W^T, x^T @ g per weight, M = `tokens`), best per
    shape over all `measure` calls, combined FLOP-weighted: sum(flops) / sum(best seconds)."""

    def __init__(self, cfg: ModelConfig, tokens: int, dtype: str = "float32") -> None:
        self.cases = []
        dt = jnp.dtype(dtype)
        key = jax.random.key(0)
        for i, (din, dout, count) in enumerate(weight_shapes(cfg)):
            k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
            x = jax.random.normal(k1, (tokens, din), dt)
            w = jax.random.normal(k2, (din, dout), dt)
            g = jax.random.normal(k3, (tokens, dout), dt)
            fwd = jax.jit(lambda x, w: jnp.dot(x, w))
            dx = jax.jit(lambda g, w: jax.lax.dot_general(g, w, (((1,), (1,)), ((), ()))))
            dw = jax.jit(lambda x, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ()))))
            for fn, args in ((fwd, (x, w)), (dx, (g, w)), (dw, (x, g))):
                jax.block_until_ready(fn(*args))
                self.cases.append([fn, args, 2.0 * tokens * din * dout * count, count, float("inf")])

    def measure(self, reps: int = 1) -> float:
        for case in self.cases:
            fn, args = case[0], case[1]
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                case[4] = min(case[4], time.perf_counter() - t)
        return self.flops_per_s

    @property
    def flops_per_s(self) -> float:
        return sum(c[2] for c in self.cases) / sum(c[4] * c[3] for c in self.cases)


def measure_peak() -> tuple[float, str]:
    """Square fp32 matmuls (for reference next to the shape peak)."""
    best, where = 0.0, ""
    for n in (512, 1024, 2048):
        f = measure_matmul_flops("float32", n=n, reps=5)
        if f > best:
            best, where = f, f"n={n}"
    return best, where


# ---- the steps --------------------------------------------------------------------------------------------
def jax_step(cfg: ModelConfig, rows: int, seq: int, *, fused: bool = True) -> tuple[Callable[[], None], float]:
    """A warmed-up `one step` closure (AdamW, fp32, one device) and its compile seconds."""
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx, schedule = build_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
    init = lambda k: init_params(cfg, k)
    abstract, mask = abstract_state(cfg, tx, lambda p: trainable_mask(p, None), init)
    fns = make_step_fns(cfg, tx, schedule, mesh, abstract, param_axes(cfg), mask,
                        loss_fn=default_loss_fn(fused=fused))
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
    return one, compile_s


def torch_step(cfg: ModelConfig, rows: int, seq: int) -> tuple[Callable[[], None], str] | None:
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

    one()
    one()
    impl = f"torch {torch.__version__.split('+')[0]} Llama"
    return one, f"{impl}|{torch.get_num_threads()} threads"


def time_round(one: Callable[[], None], steps: int) -> Timing:
    """Median wall and CPU seconds of `steps` steps; others' CPU share over the whole round."""
    ts: list[Timing] = []
    whole = timed(lambda: ts.extend(timed(one) for _ in range(steps)))
    return Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts), whole.foreign)


def stable(ratios: list[float], k: int, tol: float) -> bool:
    if len(ratios) < k:
        return False
    last = ratios[-k:]
    return (max(last) - min(last)) / statistics.median(last) <= tol


# ---- where the time goes ----------------------------------------------------------------------------------
def breakdown(cfg: ModelConfig, rows: int, seq: int, steps: int, full_step: Callable[[], None],
              fused: bool = True) -> list[tuple[str, Timing]]:
    """Median timings of: the output head + loss alone (forward, forward+backward), the model forward + loss,
    forward + backward, and the full train step (optimizer included)."""
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in next(SyntheticBatches(cfg.vocab_size, seq, rows, seed=0)).items()}
    hidden = jax.jit(lambda p, b: forward(p, b["tokens"], b["positions"], config=cfg,
                                          segment_ids=b["segment_ids"], return_hidden=True)[0])(params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)

    def head(h, w):
        return output_ce_sums(h, w, batch["targets"], mask, dtype=jnp.dtype(cfg.dtype), fused=fused)[0]

    head_f = jax.jit(head)
    head_g = jax.jit(jax.grad(head, argnums=(0, 1)))
    loss = jax.jit(lambda p, b: lm_loss(p, b, cfg, fused=fused)[0])
    grad = jax.jit(jax.grad(lambda p, b: lm_loss(p, b, cfg, fused=fused)[0]))
    cases = [("head + loss forward", lambda: head_f(hidden, params["output"])),
             ("head + loss fwd+bwd", lambda: head_g(hidden, params["output"])),
             ("model forward + loss", lambda: loss(params, batch)),
             ("model forward + backward", lambda: grad(params, batch))]
    out = []
    for label, fn in cases:
        jax.block_until_ready(fn())
        out.append((label, time_round(lambda: jax.block_until_ready(fn()), steps)))  # noqa: B023
    out.append(("full train step", time_round(full_step, steps)))
    return out


def print_table(rows: list[Row], peaks: dict[str, float], square: tuple[float, str]) -> None:
    print("\nfp32 matmul peak at each model's weight-matmul shapes (best seen in this run): "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
          + f"; square {square[0] / 1e9:.1f} GFLOP/s ({square[1]}); {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} cpus")
    head = f"{'config':<6} {'impl':<26} {'remat':<6} {'params':>8} {'tok/step':>9} {'step s':>8} {'cpu s':>7} " \
           f"{'tok/s':>8} {'MFU':>6} {'vs torch [min..max]':>21} {'rounds':>6} {'others':>6}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r.ratio:.2f}x [{r.ratio_lo:.2f}..{r.ratio_hi:.2f}]" if r.ratio is not None else "-"
        print(f"{r.name:<6} {r.impl:<26} {r.remat:<6} {r.params_m:>7.1f}M {r.tokens:>9} {r.step_s:>8.3f} "
              f"{r.cpu_s:>7.2f} {r.tok_s:>8.0f} {100 * r.mfu:>5.1f}% {ratio:>21} {r.rounds:>6} "
              f"{100 * r.foreign:>5.0f}%  {r.note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="internlm-jax bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,100m", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--remat", default="none", help="remat policies to time (none, minimal, dots, full)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers Llama baseline")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default per model); the "
                   "median of a round's steps is its time")
    p.add_argument("--rows", type=int, default=None, help="rows per step (default per model)")
    p.add_argument("--min-rounds", type=int, default=3, help="interleaved (ours, torch) rounds at least, and how "
                   "many of the last rounds must agree")
    p.add_argument("--max-rounds", type=int, default=6, help="rounds at most")
    p.add_argument("--tol", type=float, default=0.05, help="the last --min-rounds ratios agree when "
                   "(max - min) / median <= tol")
    p.add_argument("--head", default="fused", help="output head + loss: fused (train.losses), unfused (the generic "
                   "full-logits path, as before the fusion), or both: fused,unfused (timed interleaved, for A/B)")
    p.add_argument("--breakdown", action="store_true", help="also time the head, forward and forward+backward "
                   "alone: where the step's time goes")
    args = p.parse_args(argv)
    ncpu = os.cpu_count() or 1
    heads = [h.strip() for h in args.head.split(",") if h.strip()]
    if not heads or any(h not in ("fused", "unfused") for h in heads):
        print(f"--head takes fused, unfused or both, got {args.head!r}", file=sys.stderr)
        return 2

    load_before = loadavg()
    print(f"load average (1 min) before: {load_before:.2f} on {ncpu} cpus", flush=True)
    square = measure_peak()
    print(f"fp32 square matmul peak {square[0] / 1e9:.1f} GFLOP/s ({square[1]})", flush=True)
    rows: list[Row] = []
    peaks: dict[str, float] = {}
    foreign_all: list[float] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in SHAPES:
            print(f"unknown model {name!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        preset, n_rows, seq, steps = SHAPES[name]
        n_rows, steps = args.rows or n_rows, args.steps or steps
        tokens = n_rows * seq
        base = get_preset(preset).replace(dtype="float32", param_dtype="float32", attention_impl="reference")
        flops_tok = train_flops_per_token(base, seq)
        peak = ShapePeak(base, min(tokens, 1024))
        peak.measure(reps=2)
        print(f"{name}: {matmul_params(base) / 1e6:.1f}M matmul params, {flops_tok / 1e6:.0f} MFLOP/token at "
              f"T={seq}; matmul peak at its shapes {peak.flops_per_s / 1e9:.1f} GFLOP/s", flush=True)
        runners: list[tuple[str, str, str, Callable[[], None]]] = []  # (impl, remat, note, step)
        for remat in [r.strip() for r in args.remat.split(",") if r.strip()]:
            for head in heads:
                one, compile_s = jax_step(base.replace(remat=remat), n_rows, seq, fused=head == "fused")
                runners.append((f"internlm-jax ({head} head)", remat, f"compile {compile_s:.1f}s", one))
        has_torch = False
        if not args.no_torch:
            t = torch_step(base, n_rows, seq)
            if t is None:
                print("  torch/transformers not installed: no baseline row", flush=True)
            else:
                impl, note = t[1].split("|")
                runners.append((impl, "none", note, t[0]))
                has_torch = True
        timings: list[list[Timing]] = [[] for _ in runners]
        ratios: list[list[float]] = [[] for _ in runners]
        for rnd in range(args.max_rounds):
            for i, r in enumerate(runners):
                timings[i].append(time_round(r[3], steps))
            peak.measure(reps=1)
            line = []
            for i, r in enumerate(runners):
                tm = timings[i][-1]
                foreign_all.append(tm.foreign)
                txt = f"{r[0].replace(' head)', ')')}/{r[1]} {tokens / tm.wall:.0f} tok/s"
                if has_torch and i < len(runners) - 1:
                    ratios[i].append(timings[-1][-1].wall / tm.wall)
                    txt += f" ({ratios[i][-1]:.2f}x)"
                line.append(txt + f" others {100 * tm.foreign:.0f}%")
            print(f"  round {rnd + 1}: " + ", ".join(line) + f", load {loadavg():.2f}", flush=True)
            done = rnd + 1 >= args.min_rounds
            if has_torch:
                done = done and all(stable(ratios[i], args.min_rounds, args.tol) for i in range(len(runners) - 1))
            if done:
                break
        peaks[name] = peak.flops_per_s
        for i, (impl, remat, note, _) in enumerate(runners):
            walls = [t.wall for t in timings[i]]
            step_s = statistics.median(walls)
            row = Row(name, impl, remat, base.num_params() / 1e6, tokens, step_s, tokens / step_s,
                      flops_tok * tokens / step_s / peak.flops_per_s, statistics.median(t.cpu for t in timings[i]),
                      rounds=len(walls), foreign=max(t.foreign for t in timings[i]), note=note)
            if ratios[i]:
                row.ratio, row.ratio_lo, row.ratio_hi = statistics.median(ratios[i]), min(ratios[i]), max(ratios[i])
                if not stable(ratios[i], args.min_rounds, args.tol):
                    row.note += "; ratio NOT stable"
            rows.append(row)
        if args.breakdown and runners and not runners[0][0].startswith("torch"):
            print(f"  where the time goes ({name}, remat {runners[0][1]}, median of {steps}):", flush=True)
            fused = "unfused" not in runners[0][0]
            for label, tm in breakdown(base.replace(remat=runners[0][1]), n_rows, seq, steps, runners[0][3], fused):
                print(f"    {label:<26} {tm.wall:>8.3f}s wall {tm.cpu:>8.2f}s cpu  others {100 * tm.foreign:.0f}%",
                      flush=True)
    print_table(rows, peaks, square)
    load_after = loadavg()
    print(f"\nload average (1 min): before {load_before:.2f}, after {load_after:.2f} ({ncpu} cpus; the benchmark "
          f"itself adds up to ~{ncpu} while it runs)")
    busy = [f for f in foreign_all if f > BUSY_FOREIGN]
    if load_before > BUSY_LOAD_PER_CPU * ncpu or busy:
        print(f"WARNING: the machine was busy (load before {load_before:.2f} on {ncpu} cpus; {len(busy)} of "
              f"{len(foreign_all)} timed rounds had other processes using > {100 * BUSY_FOREIGN:.0f}% of the cpus, "
              f"up to {100 * max(foreign_all, default=0):.0f}%). Ratios and MFU from a busy machine are not "
              "quiet-machine numbers: torch slows more than XLA under load.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
