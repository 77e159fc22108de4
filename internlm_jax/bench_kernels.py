"""`internlm-jax bench kernels`: time the Pallas kernels against the XLA path, against the machine's own
measured limits (HBM copy bandwidth, bf16 matmul throughput).

On GPU/TPU: each kernel vs its XLA baseline (flash attention vs jax.nn.dot_product_attention, cuDNN where
available; paged attention vs the gather-then-attend reference; int4 matmul vs a bf16 dense matmul).
On CPU: the reference (XLA) paths only; the kernels' interpret mode is not a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Row:
    kernel: str
    shape: str
    ms: float | None  # the Pallas kernel
    base_ms: float | None  # the XLA baseline
    base_name: str
    work: float  # flops or bytes of one call
    unit: str  # "TFLOP/s" or "GB/s"

    def rate(self, ms: float | None) -> float | None:
        if ms is None:
            return None
        return self.work / (ms * 1e-3) / (1e12 if self.unit == "TFLOP/s" else 1e9)


def time_fn(fn: Callable, *args: Any, iters: int = 10, min_time: float = 0.2) -> float:
    """Median milliseconds of fn(*args) after compilation and a warm-up call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    start = time.perf_counter()
    while len(samples) < iters or (time.perf_counter() - start < min_time and len(samples) < 1000):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


_TIMING = {"iters": 10, "min_time": 0.2}  # run() lowers this for the smoke mode


def _try_time(fn: Callable, *args: Any) -> float | None:
    try:
        return time_fn(fn, *args, **_TIMING)
    except Exception as e:  # noqa: BLE001 -- an OOM or an unsupported baseline shows as "-" with the reason
        print(f"  ({getattr(fn, '__name__', 'fn')} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None


def measure_hbm_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of an elementwise copy (read + write) of `nbytes`."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    ms = time_fn(f, x, iters=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_peak(n: int = 8192, dtype: Any = jnp.bfloat16) -> float:
    """TFLOP/s of an n x n x n matmul."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    ms = time_fn(f, a, a, iters=5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _key(i: int) -> jax.Array:
    return jax.random.PRNGKey(i)


# ---------------------------------------------------------------------------------------------- cases
def flash_rows(T: int, *, B=1, K=8, G=4, H=128, dtype=jnp.bfloat16, run_kernel=True, backward=True,
               interpret=None, baseline_max_t=8192, backend="auto") -> list[Row]:
    from kernels_pallas.flash_attention import flash_attention

    q = jax.random.normal(_key(0), (B, T, K, G, H), dtype)
    k = jax.random.normal(_key(1), (B, T, K, H), dtype)
    v = jax.random.normal(_key(2), (B, T, K, H), dtype)
    kernel = jax.jit(lambda q, k, v: flash_attention(q, k, v, interpret=interpret, backend=backend))
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"

    def xla(q, k, v):
        out = jax.nn.dot_product_attention(q.reshape(B, T, K * G, H), k, v, is_causal=True, implementation=impl)
        return out.reshape(q.shape)
    xla = jax.jit(xla)
    flops = 4 * B * K * G * T * T * H / 2  # two matmuls, causal half
    shape = f"B{B} T{T} K{K} G{G} H{H}"
    base_ok = impl == "cudnn" or T <= baseline_max_t  # XLA's dense path materialises T x T scores
    rows = [Row("flash fwd", shape, _try_time(kernel, q, k, v) if run_kernel else None,
                _try_time(xla, q, k, v) if base_ok else None, f"dot_product_attention[{impl}]", flops, "TFLOP/s")]
    if backward:
        def grad_of(f):
            return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        rows.append(Row("flash fwd+bwd", shape, _try_time(grad_of(kernel), q, k, v) if run_kernel else None,
                        _try_time(grad_of(xla), q, k, v) if base_ok else None, f"dot_product_attention[{impl}]",
                        flops * 3.5, "TFLOP/s"))  # backward = 2.5 x forward matmul work
    return rows


def paged_rows(context: int, *, B=8, K=8, G=4, H=128, page_size=64, int8=False, run_kernel=True,
               interpret=None, backend="auto") -> list[Row]:
    from kernels_pallas.paged_attention import paged_attention, paged_attention_reference

    pages_per_seq = -(-context // page_size)
    P = B * pages_per_seq
    pdt = jnp.int8 if int8 else jnp.bfloat16
    if int8:
        kp = jax.random.randint(_key(1), (P, page_size, K, H), -127, 128, jnp.int32).astype(jnp.int8)
        vp = jax.random.randint(_key(2), (P, page_size, K, H), -127, 128, jnp.int32).astype(jnp.int8)
        scales = {"k_scales": jnp.full((P, page_size, K), 0.01, jnp.float32),
                      "v_scales": jnp.full((P, page_size, K), 0.01, jnp.float32)}
    else:
        kp = jax.random.normal(_key(1), (P, page_size, K, H), pdt)
        vp = jax.random.normal(_key(2), (P, page_size, K, H), pdt)
        scales = {}
    table = jax.random.permutation(_key(3), P).astype(jnp.int32).reshape(B, pages_per_seq)
    lengths = jnp.full((B,), context, jnp.int32)
    q = jax.random.normal(_key(0), (B, 1, K, G, H), jnp.bfloat16)
    qpos = (lengths - 1)[:, None]
    kernel = jax.jit(lambda q, kp, vp: paged_attention(q, kp, vp, table, lengths, q_positions=qpos,
                                                       interpret=interpret, backend=backend, **scales))
    ref = jax.jit(lambda q, kp, vp: paged_attention_reference(q, kp, vp, table, lengths, q_positions=qpos,
                                                              **scales))
    nbytes = 2 * B * context * K * H * jnp.dtype(pdt).itemsize + (2 * B * context * K * 4 if int8 else 0)
    return [Row("paged decode" + (" int8" if int8 else ""), f"B{B} ctx{context} K{K} G{G} ps{page_size}",
                _try_time(kernel, q, kp, vp) if run_kernel else None, _try_time(ref, q, kp, vp),
                "gather + attention", nbytes, "GB/s")]


def int4_rows(m: int, din: int, dout: int, *, group_size=128, run_kernel=True, interpret=None,
              backend="auto") -> list[Row]:
    from kernels_pallas.int4_matmul import int4_matmul, int4_matmul_reference, quantize_int4

    w = jax.random.normal(_key(1), (din, dout), jnp.float32) * 0.02
    qw = jax.jit(lambda w: quantize_int4(w, group_size))(w)
    wb = w.astype(jnp.bfloat16)
    x = jax.random.normal(_key(0), (m, din), jnp.bfloat16)
    kernel = jax.jit(lambda x, qw: int4_matmul(x, qw, interpret=interpret, backend=backend))
    dense = jax.jit(lambda x, wb: x @ wb)
    nbytes = qw.packed.size + qw.scales.size * qw.scales.dtype.itemsize + 2 * m * (din + dout)
    rows = [Row("int4 matmul", f"M{m} {din}x{dout} g{group_size}",
                _try_time(kernel, x, qw) if run_kernel else None, _try_time(dense, x, wb), "bf16 dense matmul",
                nbytes, "GB/s")]
    if not run_kernel:
        rows.append(Row("int4 matmul (reference)", rows[0].shape, None,
                        _try_time(jax.jit(int4_matmul_reference), x, qw), "dequantise + matmul", nbytes, "GB/s"))
    return rows


# ---------------------------------------------------------------------------------------------- table
def format_table(rows: list[Row], hbm_gbs: float, peak_tflops: float) -> str:
    def f(x, spec="{:.3f}"):
        return "-" if x is None else spec.format(x)

    head = ["kernel", "shape", "kernel ms", "rate", "% peak", "baseline", "base ms", "base rate", "speedup"]
    lines = []
    for r in rows:
        peak = peak_tflops if r.unit == "TFLOP/s" else hbm_gbs
        rate, base_rate = r.rate(r.ms), r.rate(r.base_ms)
        speed = r.base_ms / r.ms if r.ms and r.base_ms else None
        lines.append([r.kernel, r.shape, f(r.ms), f(rate, "{:.3g} " + r.unit),
                      f(None if rate is None else 100 * rate / peak, "{:.0f}%"), r.base_name, f(r.base_ms),
                      f(base_rate, "{:.3g} " + r.unit), f(speed, "{:.2f}x")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*line) for line in lines]
    out.append(f"peaks measured here: HBM copy {hbm_gbs:.3g} GB/s, matmul {peak_tflops:.3g} TFLOP/s")
    return "\n".join(out)


def run(mode: str, run_kernel: bool, interpret: bool | None, backend: str = "auto"
        ) -> tuple[list[Row], float, float]:
    """Rows for `mode` (smoke | cpu | full) and the measured peaks; backend picks the kernel family."""
    kw = {"run_kernel": run_kernel, "interpret": interpret, "backend": backend}
    _TIMING.update(iters=2, min_time=0.0) if mode == "smoke" else _TIMING.update(iters=10, min_time=0.2)
    if mode == "smoke":
        hbm, peak = measure_hbm_bandwidth(1 << 22), measure_matmul_peak(256, jnp.float32)
        rows = flash_rows(64, K=2, G=2, H=32, dtype=jnp.float32, backward=False, **kw)  # gpu_check tests bwd
        rows += paged_rows(40, B=2, K=2, G=2, H=32, page_size=16, **kw)
        rows += int4_rows(2, 256, 128, **kw)
        return rows, hbm, peak
    if mode == "cpu":
        hbm, peak = measure_hbm_bandwidth(1 << 27), measure_matmul_peak(1024, jnp.float32)
        rows = flash_rows(1024, K=2, G=4, H=64, run_kernel=False)
        rows += paged_rows(2048, B=4, K=2, H=64, run_kernel=False)
        rows += int4_rows(4, 2048, 2048, run_kernel=False)
        return rows, hbm, peak
    hbm, peak = measure_hbm_bandwidth(), measure_matmul_peak()
    rows: list[Row] = []
    for T in (4096, 8192, 16384, 32768):
        rows += flash_rows(T, **kw)
    for ctx in (4096, 16384, 32768):
        rows += paged_rows(ctx, **kw)
    rows += paged_rows(32768, int8=True, **kw)
    for m, din, dout in ((1, 4096, 14336), (8, 4096, 14336), (16, 14336, 4096), (512, 4096, 14336)):
        rows += int4_rows(m, din, dout, **kw)
    return rows, hbm, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="internlm-jax bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["auto", "full", "cpu", "smoke"], default="auto",
                    help="full: production shapes (GPU/TPU); cpu: reference paths only; smoke: tiny, kernels "
                         "interpreted. auto: full on an accelerator, else cpu")
    args = ap.parse_args(argv)
    on_acc = jax.default_backend() in ("gpu", "tpu")
    mode = args.mode if args.mode != "auto" else ("full" if on_acc else "cpu")
    run_kernel = mode != "cpu"
    interpret = True if mode == "smoke" and not on_acc else None
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), mode {mode}"
          + ("" if run_kernel else " (reference paths only: interpret mode is not a speed)"))
    rows, hbm, peak = run(mode, run_kernel, interpret)
    print(format_table(rows, hbm, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Row",
    "flash_rows",
    "format_table",
    "int4_rows",
    "main",
    "measure_hbm_bandwidth",
    "measure_matmul_peak",
    "paged_rows",
    "run",
    "time_fn",
]
