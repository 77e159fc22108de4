"""Resume exactness: N steps uninterrupted == N/2 steps, SIGKILL, resume to N (also with the kill landing in
the middle of an async checkpoint save). Losses and final params must be bitwise identical on CPU: the resumed
process restores params, optimizer state, step and data-iterator position exactly and runs the same compiled
step on the same batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from internlm_jax.config import get_preset
from internlm_jax.model import init_params
from internlm_jax.train.checkpointing import Checkpointer
from internlm_jax.train.loop import FAULT_ENV, read_metrics

STEPS = 8
CONFIG = """
model: {{name: internlm2-tiny}}
steps: {steps}
global_batch_size: 4
checkpoint_every: 2
keep_checkpoints: 10
async_checkpoint: true
peak_tflops: 1.0
progress: false
data:
  sources: [{{path: {corpus}}}]
  tokenizer: byte
  seq_len: 64
  shuffle: true
  shuffle_buffer: 16
mesh: {{data: 1}}
optimizer: {{lr: 3.0e-3, warmup_steps: 2}}
"""


def _run(config: str, out: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "internlm_jax.train.cli", "--config", config, f"output_dir={out}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _final_params(out: str):
    cfg = get_preset("internlm2-tiny")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    ck = Checkpointer(os.path.join(out, "checkpoints"), read_only=True)
    try:
        assert ck.latest_step() == STEPS
        return jax.tree.map(np.asarray, ck.restore_params(STEPS, target)), ck.read_json(STEPS, "data")
    finally:
        ck.close()


def _complete_steps(out: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    from internlm_jax.data.corpus import write_synthetic_corpus

    corpus = write_synthetic_corpus(tmp_path / "data", 300, seed=0)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(steps=STEPS, corpus=corpus))

    ref = str(tmp_path / "uninterrupted")
    r = _run(str(config), ref)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_losses = [m["loss"] for m in read_metrics(ref)]
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    ref_params, ref_data = _final_params(ref)

    cases = {
        # killed after step 5 (checkpoint 4 complete): resumes at 4 and redoes step 5
        "after_step": ("kill_after_step:5", [2, 4]),
        # killed right after the async save of step 6 started: 6 is not complete, so it resumes at 4
        "during_save": ("kill_during_save:6", [2, 4]),
    }
    for name, (fault, complete) in cases.items():
        out = str(tmp_path / name)
        r = _run(str(config), out, fault)
        assert r.returncode == -signal.SIGKILL, (name, r.returncode, r.stderr[-3000:])
        assert _complete_steps(out) == complete, (name, os.listdir(os.path.join(out, "checkpoints")))
        if name == "during_save":
            # The half-written step exists only as orbax's temporary folder, never under its final name.
            assert any(d.startswith("6.") for d in os.listdir(os.path.join(out, "checkpoints")))
        r = _run(str(config), out)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        assert "resumed from step 4" in r.stdout, r.stdout[-2000:]
        losses = [m["loss"] for m in read_metrics(out)]
        print(name, "losses", losses)
        assert losses == ref_losses, name  # exact float equality, step by step
        params, data = _final_params(out)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref_params)[0], jax.tree.leaves(params)):
            assert np.array_equal(a, b), (name, jax.tree_util.keystr(path))
        assert json.dumps(data, sort_keys=True) == json.dumps(ref_data, sort_keys=True), name
