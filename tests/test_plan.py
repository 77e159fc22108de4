"""`internlm-jax plan`: AOT compilation of the real train step for a TPU topology on this CPU-only host."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def _plan(*args, timeout=900):
    env = {"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "internlm_jax.cli", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu not installed: pip install -e .[tpu] to AOT-compile for TPU")
def test_plan_tiny_on_v5e_2x2_reports_memory_and_collectives():
    res = _plan("--config", "configs/pretrain/tiny.yaml", "--topology", "v5e:2x2", "mesh.data=2", "mesh.fsdp=2")
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert rec["devices"] == 4 and rec["mesh"]["data"] == 2 and rec["mesh"]["fsdp"] == 2
    assert rec["fits"] is True and 0 < rec["bytes_per_device"] < rec["hbm_bytes_per_device"]
    assert rec["flops_per_step"] > 0
    assert rec["collectives"], "a data x fsdp step must communicate"
    for key in ("topology", "params", "mesh", "hbm_bytes_per_device"):
        assert key in rec


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu not installed: pip install -e .[tpu] to AOT-compile for TPU")
def test_plan_bad_topology_and_mesh_are_clear_errors():
    res = _plan("--config", "configs/pretrain/tiny.yaml", "--topology", "v5e:3x7x9x1")
    assert res.returncode == 2 and "does not know topology" in res.stderr
    res = _plan("--config", "configs/pretrain/tiny.yaml", "--topology", "v5e:2x2", "mesh.data=1", "mesh.fsdp=3")
    assert res.returncode == 2 and "does not match topology" in res.stderr


@pytest.mark.skipif(_has_libtpu(), reason="checks the message shown when libtpu is missing")
def test_plan_without_libtpu_says_how_to_install():
    res = _plan("--config", "configs/pretrain/tiny.yaml", "--topology", "v5e:2x2", timeout=120)
    assert res.returncode == 2 and "pip install -e .[tpu]" in res.stderr
