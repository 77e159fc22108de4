"""Typed run configs for pre-training (and, through `TrainConfig`, the fine-tuning loop that reuses it).

A YAML file maps 1:1 onto these dataclasses (`internlm_jax.runconfig.load_config`); unknown keys are errors.

    model: {name: internlm2-tiny, overrides: {dtype: bfloat16, remat: full}}
    steps: 200
    global_batch_size: 16        # rows per optimizer step, all micro-batches and all hosts together
    grad_accum: 2                # micro-batches per step (each global_batch_size / grad_accum rows)
    data: {...}                  # internlm_jax.data.config.DataConfig
    mesh: {data: -1, fsdp: 1, tensor: 1}
    optimizer: {lr: 3e-4, warmup_steps: 20, schedule: cosine}
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from internlm_jax.config import PRESETS, ConfigError, ModelConfig, get_preset
from internlm_jax.data.config import DataConfig
from internlm_jax.distributed import DistributedConfig
from internlm_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which network: a preset name, an HF folder (config.json) or one of our run folders; then overrides.

    `overrides` are ModelConfig fields, typically numerics (`dtype: bfloat16`, `remat: full`) or, for small
    experiments, sizes (`num_layers: 4`).
    """

    name: str = "internlm2-tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        valid = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in self.overrides:
            if key not in valid:
                import difflib

                near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
                raise ConfigError(f"model.overrides.{key} is not a ModelConfig field"
                                  + (f"; did you mean model.overrides.{near[0]}?" if near else ""))

    def build(self) -> ModelConfig:
        """The ModelConfig: architecture from the preset or folder, then `overrides`. Weights are not loaded
        here (`TrainConfig.init_from` does that)."""
        from internlm_jax.runconfig import from_dict, to_dict

        if self.name in PRESETS:
            base = get_preset(self.name)
        elif os.path.isdir(self.name):
            base = _config_from_folder(self.name)
        else:
            get_preset(self.name)  # raises, naming the nearest presets
            raise AssertionError("unreachable")
        merged = {**to_dict(base), **self.overrides}
        if merged.get("rope_scaling") is not None:
            merged["rope_scaling"] = tuple(merged["rope_scaling"])
        return from_dict(ModelConfig, merged, "model.overrides")


def _config_from_folder(folder: str) -> ModelConfig:
    """An HF folder (config.json), a params checkpoint (model_config.json + params/) or a training run of ours
    (checkpoints/<step>/model)."""
    from internlm_jax.runconfig import from_dict
    from internlm_jax.train.checkpointing import read_model_json

    if os.path.exists(os.path.join(folder, "config.json")):
        return ModelConfig.from_hf_config(folder)
    if os.path.exists(os.path.join(folder, "model_config.json")):
        from internlm_jax.checkpoint.orbax_io import read_config

        return read_config(folder)
    saved = read_model_json(folder)
    if saved is not None:
        if saved.get("rope_scaling") is not None:
            saved["rope_scaling"] = tuple(saved["rope_scaling"])
        return from_dict(ModelConfig, saved, "model")
    raise ConfigError(f"model.name {folder!r} is a folder but neither an InternLM2 HF checkpoint (config.json), "
                      "an internlm-jax params checkpoint (model_config.json) nor a training run with checkpoints")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a learning-rate schedule and global-norm clipping.

    schedule: `cosine` (linear warmup, cosine to lr*min_lr_ratio at `decay_steps` after warmup, default the
    rest of the run), `wsd` (warmup, stable, then linear decay to lr*min_lr_ratio over the last
    `wsd_decay_fraction` of the run), `constant` (warmup then flat).
    """

    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.1
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # norms never decay; the input embedding table is this switch
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clip; 0 disables
    mu_dtype: Literal["float32", "bfloat16"] = "float32"  # first moment; the second always stays fp32

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"optimizer.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        if self.clip_norm < 0 or self.weight_decay < 0:
            raise ConfigError("optimizer.clip_norm and optimizer.weight_decay must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError(f"optimizer.b1/b2 must be in [0, 1), got {self.b1}, {self.b2}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig | None = None  # required unless a caller supplies its own batch source (hooks)
    steps: int = 100
    output_dir: str = "runs/default"
    seed: int = 0
    global_batch_size: int = 8  # rows per optimizer step across all micro-batches and hosts
    grad_accum: int = 1  # micro-batches per step, accumulated with lax.scan
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) over loss tokens (PaLM uses 1e-4)
    loss_chunk: int = 0  # >0: compute logits and loss over this many positions at a time (large vocab)
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    init_from: str | None = None  # HF folder or our run/checkpoint folder: weights only, step starts at 0
    generate_data: bool = False  # write a synthetic corpus (and tokenizer) where data paths do not exist
    synthetic_docs: int = 2000  # documents in that corpus
    log_every: int = 1
    eval_every: int = 0  # 0 disables; otherwise mean loss over `eval_batches` batches of `eval_data`
    eval_batches: int = 4
    eval_data: DataConfig | None = None
    peak_tflops: float | None = None  # per device, for MFU; None: known accelerator table, else measured
    progress: bool = True
    tensorboard: bool = True  # used when tensorboardX or torch.utils.tensorboard is importable
    # Multi-process start-up: `auto` joins when the environment says so (TPU pod workers, SLURM tasks,
    # JAX_COORDINATOR_ADDRESS); see internlm_jax.distributed.
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")
        if self.global_batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("global_batch_size and grad_accum must be positive")
        if self.global_batch_size % self.grad_accum:
            raise ConfigError(f"global_batch_size ({self.global_batch_size}) must be a multiple of grad_accum "
                              f"({self.grad_accum}): each micro-batch has global_batch_size / grad_accum rows")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if self.z_loss < 0 or self.loss_chunk < 0 or self.log_every < 1 or self.eval_every < 0:
            raise ConfigError("z_loss, loss_chunk, eval_every must be >= 0 and log_every >= 1")
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // self.grad_accum
