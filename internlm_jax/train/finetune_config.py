"""Typed fine-tuning configs: `FinetuneConfig` is a `TrainConfig` (same loop, same keys) plus the sections below.

    model: {name: /models/internlm2-chat-7b, overrides: {param_dtype: bfloat16, dtype: bfloat16}}
    mode: qlora                  # full | lora | qlora
    task: sft                    # sft | dpo
    dataset: {sources: [data/train.jsonl], seq_len: 2048, pack: true}
    lora: {rank: 64, alpha: 16, dropout: 0.1, targets: [wqkv, wo, w1, w2, w3]}
    qlora: {group_size: 64}
    dpo: {beta: 0.1, loss: sigmoid, reference: precompute}
    export: {hf_dir: runs/x/hf}
    steps: 1000                  # or epochs: 3
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from internlm_jax.config import ConfigError
from internlm_jax.data.sft import SFTDataConfig
from internlm_jax.quant.int4 import GROUP_SIZES, LAYER_TARGETS, check_targets
from internlm_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters y = W x + (alpha / rank) B A x on `targets` (wqkv, wo, w1, w2, w3, output); B starts at 0.
    `dropout` applies to the adapter input while training. Adapters are stored in `dtype`."""

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LAYER_TARGETS
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", check_targets(self.targets, "lora.targets"))
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class QLoraConfig:
    """The frozen base of `mode: qlora`: every layer weight (wqkv, wo, w1, w2, w3) in group-wise int4 with
    per-group scales (and zero points unless zero_point=false), dequantized on the fly inside the int4 matmul
    that serving uses. The output head stays in param_dtype."""

    group_size: int = 64
    zero_point: bool = True

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"qlora.group_size must be one of {GROUP_SIZES}, got {self.group_size}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation on chosen/rejected pairs.

    loss: sigmoid  -(1-eps) log s(beta h) - eps log s(-beta h)   (h = policy minus reference log-ratio margin)
          ipo      (h - 1 / (2 beta))^2 on length-averaged log-probs
    reference: precompute (the initial model's log-probs are computed once, before the first step, and saved
               beside the checkpoints) | on_the_fly (LoRA / QLoRA only: the base without adapters, every step).
    """

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    reference: Literal["precompute", "on_the_fly"] = "precompute"
    max_pairs_per_row: int = 0  # 0: as many as fit

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.max_pairs_per_row < 0:
            raise ConfigError("dpo.max_pairs_per_row must be >= 0")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What to write after training. hf_dir: an HF InternLM2 folder (full fine-tune: the weights; LoRA/QLoRA:
    adapters merged into the base). adapter_dir (LoRA/QLoRA; default <output_dir>/adapter): the adapters alone,
    as an HF PEFT folder (adapter_config.json + adapter_model.safetensors), `orbax`, or both."""

    hf_dir: str | None = None
    adapter_dir: str | None = None
    adapter_format: Literal["peft", "orbax", "both"] = "peft"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tokenizer_dir: str | None = None  # default: the dataset's / model's tokenizer folder


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """A TrainConfig plus fine-tuning sections. Base weights: `init_from` (an HF folder, an internlm-jax params
    checkpoint or a training run), defaulting to `model.name` when that is a folder; a preset name without
    init_from starts from random weights (tests, demos)."""

    mode: Literal["full", "lora", "qlora"] = "full"
    task: Literal["sft", "dpo"] = "sft"
    dataset: SFTDataConfig | None = None
    eval_dataset: SFTDataConfig | None = None
    epochs: int | None = None  # when set, steps = epochs * batches per epoch (of the first epoch's packing)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    qlora: QLoraConfig = dataclasses.field(default_factory=QLoraConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if self.eval_every:
            # TrainConfig wants its pre-training `eval_data` for eval_every; here eval_dataset plays that role,
            # so its own checks run on a copy without eval_every (which then takes the branch below).
            if self.eval_dataset is None:
                raise ConfigError("eval_every > 0 needs an eval_dataset section (held-out chats or pairs)")
            dataclasses.replace(self, eval_every=0)
        else:
            super().__post_init__()
        if self.dataset is None:
            raise ConfigError("a fine-tuning config needs a dataset section, e.g. dataset: {sources: "
                              "[data/train.jsonl], tokenizer: /models/internlm2-chat-7b, seq_len: 2048}")
        if self.data is not None:
            raise ConfigError("`data` is the pre-training pipeline; fine-tuning reads `dataset` (raw text for "
                              "continued pre-training goes there too, as {\"text\": ...} records)")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1 or null, got {self.epochs}")
        if self.task == "dpo" and self.dpo.reference == "on_the_fly" and self.mode == "full":
            raise ConfigError("dpo.reference: on_the_fly needs mode lora or qlora (the reference is the base "
                              "without adapters); a full fine-tune uses dpo.reference: precompute")
