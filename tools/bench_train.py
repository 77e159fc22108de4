#!/usr/bin/env python3
"""Same as `internlm-jax bench train` (the code lives in internlm_jax/bench_train.py)."""
import sys

from internlm_jax.bench_train import main

if __name__ == "__main__":
    sys.exit(main())
