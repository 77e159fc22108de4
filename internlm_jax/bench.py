"""`internlm-jax bench <train|engine|kernels|serve|long> [args]`: benchmarks that print ratios against a baseline run in
the same process and against this machine's measured limits (matmul FLOP/s, memory bandwidth)."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "train": "internlm_jax.bench_train",
    "engine": "internlm_jax.bench_engine",
    "kernels": "internlm_jax.bench_kernels",
    "serve": "internlm_jax.bench_serve",
    "long": "internlm_jax.bench_long",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print("usage: internlm-jax bench {" + ",".join(BENCHES) + "} [args]  (each takes --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)
