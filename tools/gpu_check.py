"""Check the Pallas GPU kernels on an NVIDIA GPU: each kernel against its pure-JAX reference on random data,
then timed against the XLA path (cuDNN attention where XLA uses it), as a table of achieved TFLOP/s or GB/s
against the card's peaks measured here (HBM copy bandwidth, bf16 matmul).

    python tools/gpu_check.py            # on a GPU machine
    python tools/gpu_check.py --smoke    # anywhere: tiny shapes, kernels in interpret mode (the CPU test)

Exit status 1 when a kernel disagrees with its reference, 2 when no GPU is visible (without --smoke).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax import bench_kernels

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _rand(i, shape, dtype):
    return jax.random.normal(jax.random.PRNGKey(i), shape, jnp.float32).astype(dtype)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def check_flash(T, G, H, dtype, interpret) -> list[tuple[str, float, float]]:
    from kernels_pallas.flash_attention import flash_attention, flash_attention_reference

    B, K = 2, 2
    q, k, v = _rand(0, (B, T, K, G, H), dtype), _rand(1, (B, T, K, H), dtype), _rand(2, (B, T, K, H), dtype)
    ct = _rand(3, (B, T, K, G, H), dtype)
    seg = jnp.asarray(np.repeat(np.arange(3), -(-T // 3))[:T][None].repeat(B, 0), jnp.int32)

    def both(fn, **kw):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids=seg, **kw), q, k, v)
        return out, pull(ct)

    out, grads = jax.jit(lambda: both(flash_attention, backend="gpu", interpret=interpret))()
    ref, rgrads = jax.jit(lambda: both(flash_attention_reference))()
    scale = max(1.0, max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in rgrads))
    tol = TOL[dtype]
    rows = [(f"flash fwd T{T} G{G} H{H} {jnp.dtype(dtype).name}", _err(out, ref), tol)]
    rows += [(f"flash d{n} T{T} G{G} H{H}", _err(a, b) / scale, tol) for n, a, b in zip("qkv", grads, rgrads)]
    return rows


def check_paged(ctx, G, H, int8, interpret) -> list[tuple[str, float, float]]:
    from kernels_pallas.paged_attention import paged_attention, paged_attention_reference

    B, K, ps, T = 3, 2, 16, 2
    n_pages = -(-ctx // ps)
    P = B * n_pages + 2
    kp, vp = _rand(1, (P, ps, K, H), jnp.float32), _rand(2, (P, ps, K, H), jnp.float32)
    table = jnp.asarray(np.random.default_rng(0).permutation(B * n_pages).reshape(B, n_pages), jnp.int32)
    lengths = jnp.asarray([ctx, max(1, ctx // 3), ctx - 5], jnp.int32)
    qpos = jnp.stack([lengths - 2, lengths - 1], 1)
    scales = {}
    if int8:
        ks, vs = jnp.max(jnp.abs(kp), -1) / 127, jnp.max(jnp.abs(vp), -1) / 127
        kp = jnp.round(kp / ks[..., None]).astype(jnp.int8)
        vp = jnp.round(vp / vs[..., None]).astype(jnp.int8)
        scales = {"k_scales": ks, "v_scales": vs}
    else:
        kp, vp = kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16)
    q = _rand(0, (B, T, K, G, H), jnp.bfloat16)
    args = (q, kp, vp, table, lengths)
    out = paged_attention(*args, q_positions=qpos, backend="gpu", interpret=interpret, num_splits=2, **scales)
    ref = paged_attention_reference(*args, q_positions=qpos, **scales)
    return [(f"paged ctx{ctx} G{G} H{H}" + (" int8" if int8 else ""), _err(out, ref), TOL[jnp.bfloat16])]


def check_int4(m, din, dout, symmetric, interpret) -> list[tuple[str, float, float]]:
    from kernels_pallas.int4_matmul import int4_matmul, int4_matmul_reference, quantize_int4

    qw = quantize_int4(_rand(1, (din, dout), jnp.float32) * 0.05, 128, symmetric)
    x = _rand(0, (m, din), jnp.bfloat16)
    ref = int4_matmul_reference(x, qw)
    out = int4_matmul(x, qw, backend="gpu", interpret=interpret)
    scale = max(1.0, float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))
    return [(f"int4 M{m} {din}x{dout} {'sym' if symmetric else 'asym'}", _err(out, ref) / scale, 1e-2)]


def run_checks(smoke: bool) -> bool:
    interpret = True if smoke else None
    if smoke:
        rows = check_flash(40, 2, 32, jnp.float32, interpret)
        rows += check_paged(40, 2, 32, False, interpret) + check_paged(40, 2, 32, True, interpret)
        rows += check_int4(3, 256, 128, True, interpret)
    else:
        rows = check_flash(1000, 4, 128, jnp.bfloat16, interpret) + check_flash(777, 8, 64, jnp.float32, interpret)
        rows += check_paged(3000, 4, 128, False, interpret) + check_paged(3000, 4, 128, True, interpret)
        rows += check_int4(8, 4096, 4096, True, interpret) + check_int4(300, 4096, 1024, False, interpret)
    ok = True
    print(f"{'check':<36} {'max err':>10} {'tol':>8}")
    for name, err, tol in rows:
        good = err <= tol
        ok &= good
        print(f"{name:<36} {err:>10.2e} {tol:>8.0e}  {'ok' if good else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, kernels in interpret mode (runs on CPU)")
    ap.add_argument("--no-bench", action="store_true", help="only the correctness checks")
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    if backend != "gpu" and not args.smoke:
        print(f"no NVIDIA GPU visible (jax backend: {backend}); use --smoke for the interpret-mode check",
              file=sys.stderr)
        return 2
    print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}")
    ok = run_checks(args.smoke)
    if not args.no_bench:
        rows, hbm, peak = bench_kernels.run("smoke" if args.smoke else "full", True,
                                            True if args.smoke and backend != "gpu" else None, backend="gpu")
        print(bench_kernels.format_table(rows, hbm, peak))
    print("all kernels match their references" if ok else "SOME KERNELS DISAGREE WITH THEIR REFERENCES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
