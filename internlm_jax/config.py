"""ModelConfig: the frozen description of an InternLM2 network, with presets and HF config.json mapping."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

RopeScaling = tuple[str, float] | None  # ("dynamic", factor), ("linear", factor) or None
ROPE_SCALING_TYPES = ("dynamic", "linear")  # dynamic NTK (base grows past M); linear (positions / factor)
RematPolicy = Literal["none", "minimal", "dots", "full"]
ImplChoice = Literal["auto", "reference", "pallas"]


class ConfigError(ValueError):
    """A model or run configuration that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 92544
    hidden_size: int = 4096  # D
    num_layers: int = 32  # L
    num_heads: int = 32  # N
    num_kv_heads: int = 8  # K
    head_dim: int = 128  # H
    intermediate_size: int = 14336  # F
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    rope_scaling: RopeScaling = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    # Numerics and execution choices (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: RematPolicy = "none"
    attention_impl: ImplChoice = "auto"
    matmul_impl: ImplChoice = "auto"
    scan_layers: bool = True
    # A context limit the user asked for explicitly, beyond max_position_embeddings x rope factor (the reference
    # keeps no cap and extrapolates). None: the model's own limit. Not written to config.json.
    max_context: int | None = None

    def __post_init__(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) "
                "for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind, factor = self.rope_scaling
            if kind not in ROPE_SCALING_TYPES:
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; use 'dynamic' (NTK, as InternLM2 "
                                  "releases do) or 'linear' (positions divided by the factor)")
            if factor < 1.0:
                raise ConfigError(f"rope_scaling factor must be >= 1.0, got {factor}")
        if self.max_context is not None and self.max_context <= 0:
            raise ConfigError(f"ModelConfig.max_context must be positive or None (the model's own limit), "
                              f"got {self.max_context}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"ModelConfig.{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        if self.remat not in ("none", "minimal", "dots", "full"):
            raise ConfigError(f"remat must be one of none|minimal|dots|full, got {self.remat!r}")
        for name in ("attention_impl", "matmul_impl"):
            if getattr(self, name) not in ("auto", "reference", "pallas"):
                raise ConfigError(f"{name} must be auto|reference|pallas, got {getattr(self, name)!r}")

    # Derived sizes, named with the dimension alphabet.
    @property
    def groups(self) -> int:  # G: query heads per kv head
        return self.num_heads // self.num_kv_heads

    def replace(self, **kwargs: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def num_params(self) -> int:
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        K, G, H = self.num_kv_heads, self.groups, self.head_dim
        per_layer = D * K * (G + 2) * H + K * G * H * D + 3 * D * F + 2 * D
        return 2 * V * D + D + L * per_layer

    # ---- HF config.json --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike, **overrides: Any) -> "ModelConfig":
        """Build from an InternLM2 `config.json` (dict, file or folder path)."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ConfigError(f"no config.json at {path}: point at an InternLM2 HF checkpoint folder")
            with open(path) as f:
                hf = json.load(f)
        assert isinstance(hf, dict)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in hf:
                raise ConfigError(f"config.json lacks {key!r}; is this an InternLM2 checkpoint?")
        if hf.get("bias", False):
            raise ConfigError("config.json has bias=true; InternLM2 has no biases and this port does not support them")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("config.json has tie_word_embeddings=true; InternLM2 uses an untied output head")
        n = hf["num_attention_heads"]
        rp = hf.get("rope_parameters")
        if isinstance(rp, dict):  # transformers >= 5 writes {"rope_type", "factor", "rope_theta"} here
            hf = {**hf, "rope_theta": rp.get("rope_theta", hf.get("rope_theta", 10000.0))}
            if hf.get("rope_scaling") is None and rp.get("rope_type", rp.get("type", "default")) != "default":
                hf["rope_scaling"] = rp
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = _parse_rope_scaling(hf)
        old_rotary = hf.get("rotary")
        if isinstance(old_rotary, dict) and "base" in old_rotary:
            theta = float(old_rotary["base"])
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=n,
            num_kv_heads=hf.get("num_key_value_heads", n),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_scaling=scaling,
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=hf.get("eos_token_id", 2),
            pad_token_id=hf.get("pad_token_id", 2) if hf.get("pad_token_id") is not None else 2,
        )
        if isinstance(fields["eos_token_id"], list):
            fields["eos_token_id"] = fields["eos_token_id"][0]
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` of the reference InternLM2 implementation for these weights."""
        return {
            "architectures": ["InternLM2ForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            },
            "model_type": "internlm2",
            "attn_implementation": "eager",
            "bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": (None if self.rope_scaling is None
                             else {"type": self.rope_scaling[0], "factor": self.rope_scaling[1]}),
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[self.param_dtype],
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


def _parse_rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    rs = hf.get("rope_scaling")
    old = hf.get("rotary")
    if rs is None and isinstance(old, dict):
        # Earliest 7B config: "rotary": {"base": 1000000, "type": "dynamic"}; factor defaults to 1.0.
        kind = old.get("type", "dynamic")
        if kind not in ("dynamic", "origin", None):
            raise ConfigError(f"unknown rotary type {kind!r} in config.json; expected 'dynamic'")
        return ("dynamic", float(old.get("scaling_factor", old.get("factor", 1.0)))) if kind == "dynamic" else None
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"rope_scaling must be null or an object, got {rs!r}")
    kind = rs.get("type", rs.get("rope_type"))
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(
            f"unsupported rope_scaling {rs!r}: InternLM2 checkpoints use null, "
            "{'type': 'dynamic', 'factor': f} or {'type': 'linear', 'factor': f}; edit config.json or convert "
            "the checkpoint")
    factor = rs.get("factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0:
        raise ConfigError(f"rope_scaling factor must be a number >= 1.0, got {factor!r} in {rs!r}")
    return (kind, float(factor))


_SHARED = dict(vocab_size=92544, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768)

PRESETS: dict[str, ModelConfig] = {
    "internlm2-1_8b": ModelConfig(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8, head_dim=128,
                                  intermediate_size=8192, **_SHARED),
    "internlm2-7b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                intermediate_size=14336, **_SHARED),
    "internlm2-20b": ModelConfig(hidden_size=6144, num_layers=48, num_heads=48, num_kv_heads=8, head_dim=128,
                                 intermediate_size=16384, **_SHARED),
    # Small presets for tests, demos and benchmarks on CPU.
    "internlm2-tiny": ModelConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=16, intermediate_size=128, rope_theta=1e4, max_position_embeddings=512),
    "internlm2-small": ModelConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                                   head_dim=32, intermediate_size=512, rope_theta=1e4, max_position_embeddings=2048),
    "internlm2-100m": ModelConfig(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                                  head_dim=64, intermediate_size=2048, rope_theta=1e4, max_position_embeddings=2048),
}
for _name in ("1_8b", "7b", "20b"):
    PRESETS[f"internlm2-chat-{_name}"] = PRESETS[f"internlm2-{_name}"]
PRESETS["internlm2-1.8b"] = PRESETS["internlm2-1_8b"]
PRESETS["internlm2-chat-1.8b"] = PRESETS["internlm2-1_8b"]


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        import difflib

        near = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"unknown model preset {name!r}.{hint} Known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
