#!/usr/bin/env bash
# Regenerate configs/pretrain/plans/*.jsonl: AOT-compile the real train step for real TPU topologies on this
# CPU-only host (needs `pip install -e .[tpu]`). Each line is one compiled variant (see `internlm-jax plan`).
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost
PY=${PYTHON:-.venv/bin/python}
out=configs/pretrain/plans
mkdir -p "$out"
plan() { local name=$1; shift; rm -f "$out/$name.jsonl"; "$PY" -m internlm_jax.cli plan --out "$out/$name.jsonl" "$@" 2>&1 | grep '^{' ; }
plan internlm2_1_8b_v5e-8 --config configs/pretrain/internlm2_1_8b.yaml --topology v5e:2x4 --search \
  --write-config "$out/internlm2_1_8b_v5e-8.best.yaml" global_batch_size=32
plan internlm2_7b_v5p-128 --config configs/pretrain/internlm2_7b.yaml --topology v5p:4x4x4
plan internlm2_20b_v5p-1024 --config configs/pretrain/internlm2_20b.yaml --topology v5p:8x8x8
plan internlm2_7b_4x_v5e-256 --config configs/pretrain/internlm2_7b.yaml --topology v5e:16x16 --num-slices 4
