"""The TPU pod launcher's dry run prints a complete command sequence and runs nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_v5p_128_prints_every_step():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/tpu_pod/launch.py"), "up", "--name", "ij-7b", "--zone", "us-east5-a",
         "--accelerator", "v5p-128", "--config", "configs/pretrain/internlm2_7b.yaml", "--dry-run", "--",
         "steps=1000"], capture_output=True, text=True, check=True, timeout=60).stdout
    cmds = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    joined = "\n".join(cmds)
    assert "16 workers" in out
    assert "queued-resources create ij-7b" in joined and "--accelerator-type=v5p-128" in joined
    assert "--runtime-version=v2-alpha-tpuv5" in joined
    assert "tpu-vm scp" in joined and "--worker=all" in joined
    assert "pip install" in joined and "[tpu]" in joined
    train = [c for c in cmds if "internlm-jax train" in c and "nohup" in c]
    assert len(train) == 1 and "steps=1000" in train[0] and "INTERNLM_JAX_DISTRIBUTED=1" in train[0]
    assert "--worker=0" in cmds[-1] and "tail" in cmds[-1]


def test_down_dry_run_and_bad_accelerator():
    out = subprocess.run([sys.executable, str(ROOT / "tools/tpu_pod/launch.py"), "down", "--name", "x", "--zone", "z",
                          "--dry-run"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "queued-resources delete x" in out
    bad = subprocess.run([sys.executable, str(ROOT / "tools/tpu_pod/launch.py"), "up", "--name", "x", "--zone", "z",
                          "--accelerator", "v9z-1", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown accelerator type" in bad.stderr and "Traceback" not in bad.stderr
    near = subprocess.run([sys.executable, str(ROOT / "tools/tpu_pod/launch.py"), "up", "--name", "x", "--zone", "z",
                           "--accelerator", "v5p-128x", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert near.returncode == 2 and "did you mean 'v5p-128'" in near.stderr and "Traceback" not in near.stderr


def test_unreachable_coordinator_is_a_clear_error():
    code = ("from internlm_jax.distributed import initialize, DistributedConfig\n"
            "initialize(DistributedConfig(coordinator_address='127.0.0.1:1', num_processes=2, process_id=1,"
            " timeout_s=2))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "did not answer within 2s" in res.stderr
