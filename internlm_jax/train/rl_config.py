"""Typed configs of `internlm-jax reward train` (RewardTrainConfig) and `internlm-jax rl` (RLConfig).

    # configs/rl/tiny_grpo.yaml (abridged)
    model: {name: internlm2-tiny, overrides: {dtype: float32}}
    init_from: runs/tiny_sft/hf          # the SFT policy (HF folder, params checkpoint or run); null = random
    mode: full                           # full | lora (LoRA: the reference is the base without adapters)
    tokenizer: byte
    prompts: [assets:sft/unit_conversion.jsonl]
    eval_prompts: [assets:sft/unit_conversion_heldout.jsonl]
    reward: {function: unit_conversion}  # or {model: runs/rm/reward_model}
    algorithm: grpo                      # grpo | ppo
    rollout: {prompts_per_step: 8, n: 4, max_tokens: 16, temperature: 1.0}
    grpo: {clip_eps: 0.2, kl_coef: 0.04}
    steps: 20
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from internlm_jax.config import ConfigError
from internlm_jax.sharding import MeshConfig
from internlm_jax.train.config import ModelSpec, OptimizerConfig
from internlm_jax.train.finetune_config import LoraConfig


@dataclasses.dataclass(frozen=True)
class RewardTrainConfig:
    """A reward model: the InternLM2 backbone with a scalar head on the last token's final-norm hidden state,
    trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) on preference pairs (the DPO
    record formats: {"prompt", "chosen", "rejected"})."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    init_from: str | None = None  # HF folder / params checkpoint / run; None: random (tests)
    mode: Literal["full", "lora"] = "full"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    tokenizer: str = "byte"  # `byte` or a tokenizer folder
    pairs: tuple[str, ...] = ("assets:rl/preference_pairs.jsonl",)
    eval_pairs: tuple[str, ...] = ()
    seq_len: int = 128  # one row holds a pair: chosen + rejected
    global_batch_size: int = 8  # pairs per step
    steps: int = 40
    seed: int = 0
    output_dir: str = "runs/reward_model"
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-3, warmup_steps=2, weight_decay=0.0, schedule="constant"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("reward training needs preference pairs: pairs: [data/pairs.jsonl]")
        if self.steps < 1 or self.global_batch_size < 1 or self.seq_len < 8:
            raise ConfigError("steps and global_batch_size must be >= 1 and seq_len >= 8")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling on the engine: `n` samples for each of `prompts_per_step` prompts, up to max_tokens each."""

    prompts_per_step: int = 8
    n: int = 4
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_len: int = 96

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.n < 1 or self.max_tokens < 1:
            raise ConfigError("rollout.prompts_per_step, rollout.n and rollout.max_tokens must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("rollout.temperature must be > 0: on-policy RL samples (greedy rollouts make every "
                              "sample of a group the same, so GRPO's advantages vanish)")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Where rewards come from: a verifiable Python function of the response (`function`: exact_match, math,
    unit_conversion, tool_call or module:function) or a reward model folder (`model`, from `reward train`)."""

    function: str | None = None
    model: str | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if (self.function is None) == (self.model is None):
            raise ConfigError("reward: give exactly one of `function` (a verifiable reward, e.g. unit_conversion) "
                              "or `model` (a reward model folder written by `internlm-jax reward train`)")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """clip_eps: PPO ratio clip. kl_coef: weight of k3 KL to the reference in the loss (GRPO); kl_reward_coef:
    per-token KL penalty in the reward (PPO). epochs x minibatches optimizer updates per rollout batch.
    PPO only: gamma, lam (GAE), vf_coef, value_clip."""

    clip_eps: float = 0.2
    kl_coef: float = 0.04
    kl_reward_coef: float = 0.0
    entropy_coef: float = 0.0
    normalize_std: bool = True  # GRPO: divide by the group's std (false = Dr. GRPO)
    epochs: int = 1
    minibatches: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    value_clip: float = 0.2
    whiten_advantages: bool = True  # PPO: advantages to mean 0 / std 1 over the batch's response tokens

    def __post_init__(self) -> None:
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_coef < 0 or self.kl_reward_coef < 0 or self.entropy_coef < 0:
            raise ConfigError("kl_coef, kl_reward_coef and entropy_coef must be >= 0")
        if self.epochs < 1 or self.minibatches < 1:
            raise ConfigError("epochs and minibatches must be >= 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("gamma and lam must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class RLEngineConfig:
    """The rollout engine's knobs (internlm_jax.engine.EngineConfig); max_num_seqs defaults to every sample of
    a step, max_model_len to max_prompt_len + max_tokens."""

    page_size: int = 16
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_dtype: str = "auto"
    warmup: bool = True


@dataclasses.dataclass(frozen=True)
class RLConfig:
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    init_from: str | None = None
    mode: Literal["full", "lora"] = "full"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    tokenizer: str = "byte"
    prompts: tuple[str, ...] = ()
    eval_prompts: tuple[str, ...] = ()
    eval_items: int = 64
    eval_every: int = 0  # 0: before and after only
    eval_max_tokens: int = 16
    reward: RewardSpec = dataclasses.field(default_factory=lambda: RewardSpec(function="exact_match"))
    algorithm: Literal["grpo", "ppo"] = "grpo"
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    grpo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    ppo: AlgoConfig = dataclasses.field(default_factory=lambda: AlgoConfig(kl_coef=0.0, kl_reward_coef=0.05))
    old_logprobs: Literal["engine", "recompute"] = "engine"  # recompute: one more policy forward per step
    loss_chunk: int = 0
    steps: int = 20
    seed: int = 0
    output_dir: str = "runs/rl"
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-5, warmup_steps=0, weight_decay=0.0, schedule="constant"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    engine: RLEngineConfig = dataclasses.field(default_factory=RLEngineConfig)
    benchmark: bool = False  # after training: rollout tok/s of a standalone engine on the last step's prompts
    save: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("rl needs prompts: prompts: [data/prompts.jsonl] (chat records whose last assistant "
                              "turn is the reference answer)")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.algorithm == "grpo" and self.rollout.n < 2:
            raise ConfigError("GRPO compares samples within a group: rollout.n must be >= 2")
        rows = self.rollout.prompts_per_step * self.rollout.n
        if rows % self.algo.minibatches:
            raise ConfigError(f"{rows} samples per step (prompts_per_step x n) do not split into "
                              f"{self.algo.minibatches} minibatches")
        if self.loss_chunk < 0:
            raise ConfigError("loss_chunk must be >= 0")

    @property
    def algo(self) -> AlgoConfig:
        return self.grpo if self.algorithm == "grpo" else self.ppo

    @property
    def seq_len(self) -> int:
        """Row length of an update batch: prompt + response, rounded up to a multiple of 16 (and of loss_chunk)."""
        n = self.rollout.max_prompt_len + self.rollout.max_tokens
        m = max(16, self.loss_chunk or 16)
        return -(-n // m) * m
