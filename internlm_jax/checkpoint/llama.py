"""InternLM2 -> Llama export (what InternLM's `tools/convert2llama.py` does): a folder that transformers'
`LlamaForCausalLM` (and every Llama-compatible tool) loads natively, without remote code.

The networks are the same; only the names and the packed wqkv differ. Our wqkv layer [D, K, G+2, H] splits
into q [D, K, G, H] (query head n = k*G + g, so [K, G] flattens to N in Llama's head order), k [D, K, H] and
v [D, K, H]; each is then transposed to HF's [out, in]. The other tensors keep InternLM2's HF layout and
are renamed:
    tok_embeddings -> embed_tokens, attention.wo -> self_attn.o_proj, feed_forward.w1/w3/w2 ->
    mlp.gate_proj/up_proj/down_proj, attention_norm -> input_layernorm, ffn_norm -> post_attention_layernorm,
    output -> lm_head.
Dynamic NTK rope scaling maps to Llama's "dynamic" rope type (the same formula: the base grows with the key
length past max_position_embeddings), linear to "linear".

The tokenizer files are copied as they are: InternLM2's tokenizer_config.json names the InternLM2 tokenizer
class (auto_map -> tokenization_internlm2.py, copied too when present), so `AutoTokenizer` still needs
`trust_remote_code=True` for it; the model itself does not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from internlm_jax.checkpoint.hf import (
    TOKENIZER_FILES,
    Params,
    check_target,
    copy_sources,
    export_leaves,
    plan_tensor,
    write_folder,
)
from internlm_jax.checkpoint.hf_layout import Target, hf_tensors
from internlm_jax.config import ModelConfig

# InternLM2 HF name (after "model.layers.{i}." for per-layer tensors) -> Llama name. wqkv splits (below).
RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER = "model.layers.{i}."


def _q_to_llama(x: np.ndarray, c: ModelConfig) -> np.ndarray:  # [D, K, G+2, H] -> [N*H, D]
    return x[:, :, :c.groups].reshape(c.hidden_size, c.num_heads * c.head_dim).T


def _k_to_llama(x: np.ndarray, c: ModelConfig) -> np.ndarray:  # [D, K, G+2, H] -> [K*H, D]
    return x[:, :, c.groups].reshape(c.hidden_size, c.num_kv_heads * c.head_dim).T


def _v_to_llama(x: np.ndarray, c: ModelConfig) -> np.ndarray:  # [D, K, G+2, H] -> [K*H, D]
    return x[:, :, c.groups + 1].reshape(c.hidden_size, c.num_kv_heads * c.head_dim).T


def llama_tensors(config: ModelConfig) -> list[tuple[str, tuple[int, ...], Target]]:
    """(Llama name, Llama [out, in] shape, where it comes from) for every tensor, in export order. A target's
    spec carries the layout map from our layer to the Llama tensor in its `to_hf`."""
    D, N, K, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    out: list[tuple[str, tuple[int, ...], Target]] = []
    for name, target in hf_tensors(config):
        spec = target.spec
        if spec.path == ("layers", "wqkv"):
            prefix = _LAYER.format(i=target.layer)
            for proj, rows, fn in (("q", N * H, _q_to_llama), ("k", K * H, _k_to_llama), ("v", K * H, _v_to_llama)):
                split = dataclasses.replace(spec, hf_name=f"{_LAYER}self_attn.{proj}_proj.weight", to_hf=fn)
                out.append((f"{prefix}self_attn.{proj}_proj.weight", (rows, D), Target(split, target.layer)))
            continue
        if spec.stacked:
            suffix = spec.hf_name.removeprefix(_LAYER)
            llama_name = _LAYER.format(i=target.layer) + RENAMES[suffix]
        else:
            llama_name = RENAMES[spec.hf_name]
        out.append((llama_name, tuple(spec.hf_shape(config)), target))
    return out


def llama_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` of transformers' Llama for the same network."""
    scaling = None
    if config.rope_scaling is not None:
        kind, factor = config.rope_scaling
        # Both keys: transformers < 4.45 reads "type", later versions "rope_type" (5.x moves it into
        # rope_parameters itself when it reads this legacy field).
        scaling = {"type": kind, "rope_type": kind, "factor": factor}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": scaling,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": config.param_dtype,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def save_llama(path: str | os.PathLike, params: Params, config: ModelConfig, *,
               tokenizer_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None,
               max_shard_bytes: int = 2**30, dtype: Any = None, overwrite: bool = False,
               progress: bool = True) -> None:
    """Write a Llama HF folder: config.json (LlamaForCausalLM), generation_config.json, sharded safetensors
    with their index, and the tokenizer files of `source_dir` / `tokenizer_dir` (the latter wins).

    Streams one layer of one leaf at a time to the host and renames a finished temporary folder into place,
    exactly like `save_hf` (it shares that writer). The InternLM2 remote code is not copied: Llama needs none.
    """
    target = check_target(path, overwrite)
    sources = copy_sources(source_dir, tokenizer_dir)
    leaves, config = export_leaves(params, config, dtype)
    planned = [plan_tensor(name, shape, leaves[t.spec.path], t, config) for name, shape, t in llama_tensors(config)]
    write_folder(target, planned, llama_config(config), config, sources, max_shard_bytes=max_shard_bytes,
                 progress=progress, file_names=TOKENIZER_FILES + ("generation_config.json",))
