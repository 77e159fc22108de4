"""Training: configs, optimizer, train step, orbax checkpoints and the loop (pre-training and fine-tuning).

Names resolve lazily so that `import internlm_jax.train.step` does not pull in the data pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "internlm_jax.train.config",
    "ModelSpec": "internlm_jax.train.config",
    "OptimizerConfig": "internlm_jax.train.config",
    "build_optimizer": "internlm_jax.train.optimizer",
    "make_schedule": "internlm_jax.train.optimizer",
    "lm_loss": "internlm_jax.train.step",
    "head_ce_sums": "internlm_jax.train.losses",
    "head_token_ce": "internlm_jax.train.losses",
    "make_step_fns": "internlm_jax.train.step",
    "Checkpointer": "internlm_jax.train.checkpointing",
    "train": "internlm_jax.train.loop",
    "TrainHooks": "internlm_jax.train.loop",
    "TrainResult": "internlm_jax.train.loop",
    "train_flops_per_token": "internlm_jax.train.flops",
    "SyntheticBatches": "internlm_jax.train.synthetic",
}
__all__ = ["Checkpointer", "ModelSpec", "OptimizerConfig", "SyntheticBatches", "TrainConfig", "TrainHooks",
           "TrainResult", "build_optimizer", "head_ce_sums", "head_token_ce", "lm_loss", "make_schedule", "make_step_fns", "train",
           "train_flops_per_token"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'internlm_jax.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
