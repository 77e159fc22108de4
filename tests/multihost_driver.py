"""One process of a multi-process CPU training run (used by tests/test_multihost.py).

    python tests/multihost_driver.py OUT STEPS NUM_PROCESSES PROCESS_ID PORT LOSSES_JSON

Trains the tiny preset on a deterministic synthetic batch stream whose global batch does not depend on the
process count (each process takes its rows of the same global batch), so 1 x 8 and 2 x 4 devices must agree.
"""

import json
import sys

from internlm_jax.distributed import DistributedConfig
from internlm_jax.runconfig import from_dict
from internlm_jax.train.config import TrainConfig
from internlm_jax.train.loop import TrainHooks, train
from internlm_jax.train.synthetic import SyntheticBatches


def main() -> None:
    out, steps, nproc, pid, port, losses_path = sys.argv[1:7]
    cfg = from_dict(TrainConfig, {
        "model": {"name": "internlm2-tiny"}, "steps": int(steps), "output_dir": out, "seed": 0,
        "global_batch_size": 8, "checkpoint_every": 3, "keep_checkpoints": 3, "async_checkpoint": True,
        "progress": False, "tensorboard": False, "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2},
    })
    if int(nproc) > 1:
        cfg = cfg.__class__(**{**cfg.__dict__, "distributed": DistributedConfig(
            enabled="on", coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid),
            timeout_s=120)})

    def source(cfg, model, process_index, process_count):
        return SyntheticBatches(model.vocab_size, 64, cfg.global_batch_size, seed=0, process_index=process_index,
                                process_count=process_count)

    result = train(cfg, TrainHooks(batch_source=source))
    if int(pid) == 0:
        with open(losses_path, "w") as f:
            json.dump({r["step"]: r["loss"] for r in result.history}, f)


if __name__ == "__main__":
    main()
