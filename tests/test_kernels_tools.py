"""tools/gpu_check.py in --smoke mode (interpret, tiny shapes) and the `bench kernels` table."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from internlm_jax import bench_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_gpu_check_smoke_checks_and_benchmarks(capsys):
    assert _gpu_check().main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "all kernels match their references" in out
    for name in ("flash dk", "paged ctx40 G2 H32 int8", "int4 M3", "flash fwd", "paged decode", "% peak"):
        assert name in out
    assert "FAIL" not in out


def test_gpu_check_without_gpu_says_so(capsys):
    assert _gpu_check().main([]) == 2
    assert "no NVIDIA GPU visible" in capsys.readouterr().err


def test_bench_table_rates_and_speedups():
    rows = [bench_kernels.Row("flash fwd", "T4096", 2.0, 4.0, "cudnn", 2e12, "TFLOP/s"),
            bench_kernels.Row("int4 matmul", "M1", 0.5, None, "dense", 1e9, "GB/s")]
    table = bench_kernels.format_table(rows, hbm_gbs=4000.0, peak_tflops=1000.0)
    assert "1e+03 TFLOP/s" in table and "100%" in table and "2.00x" in table  # 2e12 flop in 2 ms
    assert "2e+03 GB/s" in table and "50%" in table  # 1e9 bytes in 0.5 ms against 4000 GB/s


@pytest.mark.slow
def test_bench_kernels_cpu_mode_runs_reference_paths(capsys):
    assert bench_kernels.main(["--mode", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reference paths only" in out and "gather + attention" in out
