"""Parity with an independent implementation: transformers' PyTorch Llama, its weights mapped into
InternLM2's HF layout, loaded through `load_hf`, run by our `forward` (fp32, tolerance 1e-4 max abs)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import llama_from_internlm2, read_internlm2_folder, tiny_llama, write_internlm2_folder

from internlm_jax.checkpoint.hf import load_hf, save_hf
from internlm_jax.config import ModelConfig
from internlm_jax.model import forward, init_cache

TOL = 1e-4
# Group sizes G = 1, 2, 4; head dims 16, 32, 64; 2-3 layers.
CASES = {
    "g1_h16_l2": {"heads": 4, "kv_heads": 4, "head_dim": 16, "layers": 2, "hidden": 64, "intermediate": 96, "seed": 1},
    "g2_h32_l3": {"heads": 4, "kv_heads": 2, "head_dim": 32, "layers": 3, "hidden": 96, "intermediate": 160, "seed": 2},
    "g4_h64_l2": {"heads": 8, "kv_heads": 2, "head_dim": 64, "layers": 2, "hidden": 128, "intermediate": 192, "seed": 3},
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    llama = tiny_llama(**CASES[request.param])
    folder = write_internlm2_folder(llama, tmp_path_factory.mktemp(request.param) / "hf")
    config, params = load_hf(folder, progress=False)
    fwd = jax.jit(lambda p, t, c: forward(p, t, config=config, cache=c))
    return llama, config, params, fwd, folder


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def test_config_maps_to_ours(case):
    llama, config, *_ = case
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers) == (
        llama.config.num_attention_heads, llama.config.num_key_value_heads, llama.config.head_dim,
        llama.config.num_hidden_layers)
    assert config.param_dtype == "float32"


def test_logits_match_transformers(case):
    llama, config, params, fwd, _ = case
    rng = np.random.default_rng(0)
    for shape in [(3, 20), (1, 33)]:  # several prompts, two lengths
        tokens = rng.integers(0, config.vocab_size, shape).astype(np.int32)
        ours, _ = fwd(params, tokens, None)
        ref = _hf_logits(llama, tokens)
        assert np.abs(ref).max() > 1.0  # the check is meaningful: logits are not all ~0
        np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_greedy_decoding_matches_generate(case):
    llama, config, params, fwd, _ = case
    new = 16
    prompts = np.random.default_rng(1).integers(3, config.vocab_size, (2, 8)).astype(np.int32)
    llama.generation_config.eos_token_id = None  # run the full length; never stop early
    with torch.no_grad():
        ref = llama.generate(torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)[:, prompts.shape[1]:].numpy()
    assert ref.shape == (2, new)

    cache = init_cache(config, batch=2, max_len=prompts.shape[1] + new)
    logits, cache = fwd(params, prompts, cache)
    out = []
    for _ in range(new):
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(np.asarray(tok))
        logits, cache = fwd(params, tok[:, None], cache)
    ours = np.stack(out, axis=1)
    assert len(set(ref.ravel().tolist())) > 3  # a real sequence, not one repeated token
    np.testing.assert_array_equal(ours, ref)


def test_dynamic_ntk_rope_beyond_max_positions(tmp_path):
    max_pos, factor = 32, 2.0
    kw = {"heads": 4, "kv_heads": 2, "head_dim": 32, "layers": 2, "hidden": 96, "intermediate": 160, "seed": 4,
          "max_pos": max_pos}
    llama = tiny_llama(dynamic_factor=factor, **kw)
    folder = write_internlm2_folder(llama, tmp_path / "hf")
    with open(folder + "/config.json") as f:
        assert json.load(f)["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    config, params = load_hf(folder, progress=False)
    assert config.rope_scaling == ("dynamic", 2.0)

    seq = 3 * max_pos
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, seq)).astype(np.int32)
    ref = _hf_logits(llama, tokens)
    # transformers really applied dynamic NTK, with INTERNLM2.md's base formula for S = 3M:
    h, theta = config.head_dim, config.rope_theta
    base = theta * ((factor * seq / max_pos) - (factor - 1)) ** (h / (h - 2))
    want_inv_freq = 1.0 / (base ** (np.arange(0, h, 2) / h))
    np.testing.assert_allclose(llama.model.rotary_emb.inv_freq.numpy(), want_inv_freq, rtol=1e-5)
    # ... and it changes the result (so the comparison below tests the scaling, not plain RoPE).
    plain = tiny_llama(**kw)
    plain.load_state_dict(llama.state_dict())
    assert np.abs(_hf_logits(plain, tokens) - ref).max() > 10 * TOL

    ours, _ = jax.jit(lambda p, t: forward(p, t, config=config))(params, tokens)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_export_then_transformers_matches(case, tmp_path):
    llama, config, params, fwd, folder = case
    out = tmp_path / "export"
    save_hf(out, params, config, max_shard_bytes=40_000, progress=False)  # small shards: several files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    exported = read_internlm2_folder(out)
    original = _source_tensors(folder)
    assert exported.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(exported[name], t), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    assert ModelConfig.from_hf_config(str(out)) == config.replace(param_dtype="float32")
    assert json.loads((out / "config.json").read_text()) == config.to_hf_config()

    reloaded = llama_from_internlm2(exported, llama)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (3, 20)).astype(np.int32)  # compiled above
    ours, _ = fwd(params, tokens, None)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), np.asarray(ours), atol=TOL, rtol=0)


def _source_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder + "/model.safetensors")
