"""An independent reference for parity tests: a tiny random transformers `LlamaForCausalLM`, its weights
mapped into InternLM2's HF layout (and back), written as an HF folder.

InternLM2 = Llama with packed wqkv (rows grouped per kv head: G queries, k, v) and renamed tensors:
q/k/v_proj -> attention.wqkv, o_proj -> attention.wo, gate/up/down -> feed_forward.w1/w3/w2,
input_layernorm -> attention_norm, post_attention_layernorm -> ffn_norm, embed_tokens -> tok_embeddings,
lm_head -> output.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

_RENAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def tiny_llama(*, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2, hidden: int = 64,
               intermediate: int = 96, vocab: int = 128, max_pos: int = 256, rope_theta: float = 10000.0,
               dynamic_factor: float | None = None, seed: int = 0, init_std: float = 0.15) -> LlamaForCausalLM:
    """A random fp32 Llama with eager attention. init_std is larger than usual so that logits are spread
    out (greedy decoding then has clear winners instead of near ties)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if dynamic_factor is not None:
        rope = {"rope_type": "dynamic", "factor": dynamic_factor, "rope_theta": rope_theta}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
                      rope_parameters=rope, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      initializer_range=init_std, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # norms start at 1; make them non-trivial so a swapped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.eval()


def internlm2_config(llama: LlamaConfig) -> dict[str, Any]:
    """config.json of the same network in InternLM2's format."""
    rp = llama.rope_parameters
    scaling = None
    if rp.get("rope_type") == "dynamic":
        scaling = {"type": "dynamic", "factor": rp["factor"]}
    return {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
        "vocab_size": llama.vocab_size, "hidden_size": llama.hidden_size,
        "intermediate_size": llama.intermediate_size, "num_hidden_layers": llama.num_hidden_layers,
        "num_attention_heads": llama.num_attention_heads, "num_key_value_heads": llama.num_key_value_heads,
        "head_dim": llama.head_dim, "max_position_embeddings": llama.max_position_embeddings,
        "rms_norm_eps": llama.rms_norm_eps, "rope_theta": rp["rope_theta"], "rope_scaling": scaling,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def llama_to_internlm2(sd: dict[str, torch.Tensor], llama: LlamaConfig) -> dict[str, torch.Tensor]:
    n, k, h, d = llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim, llama.hidden_size
    g = n // k
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(llama.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q = sd[src + "self_attn.q_proj.weight"].reshape(k, g, h, d)
        kk = sd[src + "self_attn.k_proj.weight"].reshape(k, 1, h, d)
        v = sd[src + "self_attn.v_proj.weight"].reshape(k, 1, h, d)
        out[dst + "attention.wqkv.weight"] = torch.cat([q, kk, v], dim=1).reshape(k * (g + 2) * h, d).contiguous()
        for a, b in _RENAMES.items():
            out[dst + b] = sd[src + a]
    return {name: t.detach().clone().contiguous() for name, t in out.items()}


def internlm2_to_llama(sd: dict[str, torch.Tensor], llama: LlamaConfig) -> dict[str, torch.Tensor]:
    n, k, h, d = llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim, llama.hidden_size
    g = n // k
    out = {"model.embed_tokens.weight": sd["model.tok_embeddings.weight"], "model.norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(llama.num_hidden_layers):
        p = f"model.layers.{i}."
        wqkv = sd[p + "attention.wqkv.weight"].reshape(k, g + 2, h, d)
        out[p + "self_attn.q_proj.weight"] = wqkv[:, :g].reshape(n * h, d)
        out[p + "self_attn.k_proj.weight"] = wqkv[:, g].reshape(k * h, d)
        out[p + "self_attn.v_proj.weight"] = wqkv[:, g + 1].reshape(k * h, d)
        for a, b in _RENAMES.items():
            out[p + a] = sd[p + b]
    return {name: t.contiguous() for name, t in out.items()}


def write_internlm2_folder(model: LlamaForCausalLM, folder: str | os.PathLike, *, fmt: str = "safetensors",
                           shards: int = 1, dtype: torch.dtype = torch.float32,
                           config_overrides: dict[str, Any] | None = None,
                           drop: tuple[str, ...] = (), extra: dict[str, torch.Tensor] | None = None) -> str:
    """Write the model as an InternLM2 HF folder: safetensors or .bin, optionally in `shards` files with an
    index. `drop`/`extra` remove or add tensors (for error tests)."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    sd = llama_to_internlm2(model.state_dict(), model.config)
    sd = {k: v.to(dtype) for k, v in sd.items() if k not in drop}
    sd.update(extra or {})
    cfg = internlm2_config(model.config)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.update(config_overrides or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = list(sd)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        files = {f"{stem}.{ext}": names}
    else:
        files = {f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}": grp for i, grp in enumerate(groups)}
    for fname, grp in files.items():
        part = {n: sd[n] for n in grp}
        if fmt == "safetensors":
            save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(folder, fname))
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {n: fname for fname, grp in files.items() for n in grp}}
        with open(os.path.join(folder, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump(index, f)
    return folder


def read_internlm2_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an exported folder, read with the safetensors library (independent of our reader)."""
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(os.path.join(folder, fname)))
    assert set(out) == set(index["weight_map"]), "index and shard contents disagree"
    return out


def llama_from_internlm2(sd: dict[str, torch.Tensor], template: LlamaForCausalLM) -> LlamaForCausalLM:
    """A fresh Llama with `template`'s config and the (inverse-mapped) InternLM2 weights."""
    model = LlamaForCausalLM(template.config).to(torch.float32)
    model.load_state_dict({k: v.to(torch.float32) for k, v in internlm2_to_llama(sd, template.config).items()},
                          strict=True)
    model.config._attn_implementation = "eager"
    return model.eval()
