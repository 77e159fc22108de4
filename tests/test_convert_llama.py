"""`internlm-jax convert --to-llama`: the export loads in transformers' own `LlamaForCausalLM` (no remote code)
and gives our logits (fp32, 1e-5 max abs), for grouped-query and multi-head attention, with and without
dynamic NTK scaling; from an HF folder or from our orbax checkpoint; tokenizer files copied."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from fixtures import make_tokenizer_dir
from hf_reference import tiny_llama, write_internlm2_folder
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from internlm_jax.checkpoint import CheckpointError, load_hf, save_llama
from internlm_jax.checkpoint.cli import main as convert_main
from internlm_jax.checkpoint.llama import llama_config
from internlm_jax.config import get_preset
from internlm_jax.model import forward, init_params

TOL = 1e-5
VOCAB = 512  # the smallest fixture tokenizer
# Weight scale: logits spread to |3| or so (a wrong mapping is off by O(1)) while fp32 rounding between torch
# and XLA (over 2 layers, rope angles up to position 23) stays near 3e-6, well inside TOL.
INIT_STD = 0.1
SHAPE = {"head_dim": 16, "layers": 2, "hidden": 64, "intermediate": 96}
CASES = {  # G = 2 (GQA, N=4, K=2) and G = 1 (MHA); the dynamic case runs past max_position_embeddings
    "gqa": {**SHAPE, "heads": 4, "kv_heads": 2, "seed": 11},
    "mha": {**SHAPE, "heads": 4, "kv_heads": 4, "seed": 12},
    "gqa_dynamic": {**SHAPE, "heads": 4, "kv_heads": 2, "seed": 13, "max_pos": 16, "dynamic_factor": 2.0},
    # The same weights under linear scaling (config.json only: tiny_llama has no linear option).
    "gqa_linear": {**SHAPE, "heads": 4, "kv_heads": 2, "seed": 14, "rope_scaling": {"type": "linear", "factor": 4.0}},
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), VOCAB)


def _source(tmp_path, tok_dir: str, case: str) -> str:
    spec = dict(CASES[case])
    overrides = {"rope_scaling": spec.pop("rope_scaling")} if "rope_scaling" in spec else {}
    folder = write_internlm2_folder(tiny_llama(vocab=VOCAB, init_std=INIT_STD, **spec), tmp_path / "src",
                                    config_overrides=overrides)
    for name in TOKENIZER_FILES:
        with open(os.path.join(tok_dir, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    (tmp_path / "src" / "modeling_internlm2.py").write_text("# remote code: a Llama export must not carry it\n")
    return folder


def _llama_logits(folder, tokens: np.ndarray) -> np.ndarray:
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_llama_export_gives_our_logits(tmp_path, tok_dir, case, capsys):
    src = _source(tmp_path, tok_dir, case)
    out = tmp_path / "llama"
    assert convert_main(["--from-hf", src, "--to-llama", str(out), "--max-shard-size", "40KB", "--quiet"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out

    files = set(os.listdir(out))
    assert set(TOKENIZER_FILES) <= files and "modeling_internlm2.py" not in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded, with an index
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    spec = CASES[case]
    assert cfg["num_key_value_heads"] == spec["kv_heads"] and cfg["rope_theta"] == 10000.0
    if "dynamic_factor" in spec or "rope_scaling" in spec:
        kind, factor = ("dynamic", 2.0) if "dynamic_factor" in spec else ("linear", 4.0)
        assert cfg["rope_scaling"]["rope_type"] == kind and cfg["rope_scaling"]["factor"] == factor
        assert LlamaConfig.from_pretrained(str(out)).rope_parameters["rope_type"] == kind
    else:
        assert cfg["rope_scaling"] is None

    config, params = load_hf(src, progress=False)
    length = 24 if "dynamic_factor" in spec else 20  # past max_position_embeddings=16: the NTK base grows
    tokens = np.random.default_rng(7).integers(0, VOCAB, (2, length)).astype(np.int32)
    ours, _ = jax.jit(lambda p, t: forward(p, t, config=config))(params, tokens)
    ref = _llama_logits(out, tokens)
    assert np.abs(ref).max() > 1.0  # logits are spread out: the comparison means something
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"{case}: max |llama - ours| = {diff:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert diff <= TOL, diff


def test_llama_export_from_orbax_checkpoint_matches_hf_route(tmp_path, tok_dir):
    """--from CKPT --to-llama (with --tokenizer) writes the same tensors as --from-hf --to-llama."""
    src = _source(tmp_path, tok_dir, "gqa")
    ckpt, via_hf, via_ckpt = tmp_path / "ckpt", tmp_path / "a", tmp_path / "b"
    assert convert_main(["--from-hf", src, "--to", str(ckpt), "--quiet"]) == 0
    assert convert_main(["--from-hf", src, "--to-llama", str(via_hf), "--quiet"]) == 0
    assert convert_main(["--from", str(ckpt), "--to-llama", str(via_ckpt), "--tokenizer", tok_dir, "--quiet"]) == 0
    a, b = load_file(str(via_hf / "model-00001-of-00001.safetensors")), \
        load_file(str(via_ckpt / "model-00001-of-00001.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 3 + 2 * 9
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((via_hf / "config.json").read_text()) == json.loads((via_ckpt / "config.json").read_text())
    for name in TOKENIZER_FILES:
        assert (via_ckpt / name).read_bytes() == (via_hf / name).read_bytes()


def test_llama_layout_of_split_wqkv(tmp_path):
    """q/k/v rows follow Llama's head order: query head n = k*G + g of our [D, K, G+2, H] wqkv."""
    config = get_preset("internlm2-tiny", vocab_size=64)  # N=4, K=2, G=2, H=16, D=64
    params = init_params(config, jax.random.PRNGKey(0))
    save_llama(tmp_path / "out", params, config, progress=False)
    sd = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    wqkv = np.asarray(params["layers"]["wqkv"][1])  # [D, K, G+2, H]
    G, H = config.groups, config.head_dim
    q, k, v = (sd[f"model.layers.1.self_attn.{p}_proj.weight"].numpy() for p in "qkv")
    assert q.shape == (config.num_heads * H, config.hidden_size) and k.shape == v.shape == (2 * H, config.hidden_size)
    for n in range(config.num_heads):
        np.testing.assert_array_equal(q[n * H:(n + 1) * H], wqkv[:, n // G, n % G].T)
    for kv in range(config.num_kv_heads):
        np.testing.assert_array_equal(k[kv * H:(kv + 1) * H], wqkv[:, kv, G].T)
        np.testing.assert_array_equal(v[kv * H:(kv + 1) * H], wqkv[:, kv, G + 1].T)
    wo = np.asarray(params["layers"]["wo"][0])  # [K, G, H, D]
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.o_proj.weight"].numpy(), wo.reshape(-1, 64).T)
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), np.asarray(params["output"]).T)
    np.testing.assert_array_equal(sd["model.layers.0.mlp.down_proj.weight"].numpy(),
                                  np.asarray(params["layers"]["w2"][0]).T)


def test_linear_rope_scaling_maps_to_llama_linear():
    cfg = llama_config(get_preset("internlm2-tiny", rope_scaling=("linear", 4.0)))
    assert cfg["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 4.0}
    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["factor"] == 4.0


def test_to_llama_errors(tmp_path, tok_dir, capsys):
    src = _source(tmp_path, tok_dir, "gqa")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    assert convert_main(["--from-hf", src, "--to-llama", str(tmp_path / "taken"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["--from-hf", src, "--to-llama", str(tmp_path / "o"), "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer.model" in capsys.readouterr().err
    config, params = load_hf(src, progress=False)
    with pytest.raises(CheckpointError, match="param layers/wqkv has shape"):
        save_llama(tmp_path / "p", params, config.replace(num_kv_heads=4), progress=False)
