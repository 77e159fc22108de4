"""2 processes x 4 CPU devices (gloo over loopback) train like 1 process x 8 devices, and checkpoints written
by either resume in the other."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DRIVER = Path(__file__).with_name("multihost_driver.py")
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, steps: int, nproc: int, tag: str) -> dict[int, float]:
    devices = 8 // nproc
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = _port()
    losses = out.parent / f"losses_{tag}.json"
    procs = [subprocess.Popen([sys.executable, str(DRIVER), str(out), str(steps), str(nproc), str(i), str(port),
                               str(losses)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(nproc)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return {int(k): v for k, v in json.loads(losses.read_text()).items()}


def test_two_processes_match_one_and_checkpoints_cross_resume(tmp_path):
    one = _run(tmp_path / "one", 6, 1, "one")
    two = _run(tmp_path / "two", 6, 2, "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)], rtol=1e-5)

    # 2-process run to step 3 (checkpoint), resumed by 1 process to step 6.
    run = tmp_path / "two_then_one"
    _run(run, 3, 2, "a")
    resumed = _run(run, 6, 1, "b")
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [one[s] for s in (4, 5, 6)], rtol=1e-5)

    # and the other way round.
    run = tmp_path / "one_then_two"
    _run(run, 3, 1, "c")
    resumed = _run(run, 6, 2, "d")
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [one[s] for s in (4, 5, 6)], rtol=1e-5)
