"""Fine-tuning with LoRA on the training loop, through the model: the loss mask is exactly the assistant
targets and nothing outside them reaches the loss; a trained LoRA run's adapters, merged export and
`convert merge` all compute the LoRA model's logits; merges onto the wrong base fail clearly.

LoRA at initialisation giving exactly the base logits, and merge == base + adapter on random adapters, are
shown (without the training loop) in tests/test_peft_lora.py::test_lora_init_is_exactly_the_base_and_merge_matches.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm_jax.config import ConfigError, get_preset
from internlm_jax.data.sft import ChatByteTokenizer, PackedBatches, SFTDataConfig, load_units
from internlm_jax.data.sft_synthetic import unit_conversion
from internlm_jax.layers import linear
from internlm_jax.model import forward, param_shapes
from internlm_jax.runconfig import load_config
from internlm_jax.train.finetune import FinetuneConfig, finetune, initial_params
from internlm_jax.train.step import token_cross_entropy
from tests.test_finetune_data import ANSWERS, TOOL_CHAT, _write

CFG = get_preset("internlm2-tiny")


def _host_params(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray((1.0 if "norm" in jax.tree_util.keystr(p) else 0.0) + 0.05 * rng.normal(size=s),
                                 jnp.float32), param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))


def test_loss_reaches_only_assistant_targets(tmp_path):
    """Tokens outside assistant turns still shape later answers through attention, so the check is on the loss
    itself: its mask is 1 exactly on assistant targets, its gradient w.r.t. the final hidden state (and the
    logits) of every other position is exactly 0, and changing those positions' logits leaves it bit-identical."""
    tok = ChatByteTokenizer()
    other = {"conversation": [{"system": "S", "input": "Convert 3 km to m.", "output": "3000 m"}]}
    path = _write(tmp_path / "two.jsonl", [TOOL_CHAT, other])
    units, _ = load_units(SFTDataConfig(sources=(path,), tokenizer="byte", seq_len=512), tok)
    batch = next(PackedBatches(units, 512, 1, pad_id=tok.pad_id, shuffle=False))
    mask = batch["loss_mask"][0]
    # The mask, from the tokens: 1 exactly where the target lies in an assistant body or its <|im_end|>.
    targets = batch["targets"][0]
    assert tok.decode(targets[np.flatnonzero(mask)]) == "".join(ANSWERS) + "3000 m<|im_end|>"
    params = _host_params()
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    hidden, _ = jax.jit(lambda p: forward(p, b["tokens"], b["positions"], config=CFG, segment_ids=b["segment_ids"],
                                          return_hidden=True))(params)

    def loss_of_logits(logits):
        ce, _ = token_cross_entropy(logits, b["targets"])
        return jnp.sum(ce * b["loss_mask"])

    def loss_of_hidden(h):
        return loss_of_logits(linear(h, params["output"], "D", "V", jnp.float32))

    g_hidden = np.asarray(jax.jit(jax.grad(loss_of_hidden))(hidden))[0]  # [T, D]
    off = mask == 0
    assert np.all(g_hidden[off] == 0.0)
    assert np.all(np.abs(g_hidden[~off]).max(axis=-1) > 0)
    logits = linear(hidden, params["output"], "D", "V", jnp.float32)
    noise = jnp.asarray(np.random.default_rng(1).normal(size=logits.shape) * 10, jnp.float32)
    perturbed = logits + noise * jnp.asarray(off, jnp.float32)[None, :, None]
    assert float(loss_of_logits(perturbed)) == float(loss_of_logits(logits))
    assert float(loss_of_logits(logits + noise * jnp.asarray(~off, jnp.float32)[None, :, None])) != \
        float(loss_of_logits(logits))


def test_a_lora_run_starts_exactly_at_its_base(tmp_path):
    full = _lora_cfg(tmp_path, "mode=full")
    lora = _lora_cfg(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 265, (2, 16)), jnp.int32)
    fwd = jax.jit(lambda p: forward(p, tokens, config=CFG)[0])
    a, b = fwd(initial_params(full, CFG)), fwd(initial_params(lora, CFG))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # B = 0: not close, equal


def _lora_cfg(tmp_path, *extra):
    data = _write(tmp_path / "train.jsonl", unit_conversion(64))
    return load_config(FinetuneConfig, None, [
        f"output_dir={tmp_path / 'run'}", "mode=lora", "steps=4", "global_batch_size=4", "checkpoint_every=2",
        "progress=false", "tensorboard=false", "optimizer.lr=1e-2", "optimizer.warmup_steps=1",
        "lora.rank=4", "lora.alpha=8", "lora.targets=[wqkv, wo, w1, w2, w3, output]", "lora.dropout=0.1",
        f"dataset={{sources: [{data}], tokenizer: byte, seq_len: 64}}", "export.hf_dir=hf",
        "export.adapter_format=both", *extra])


@pytest.mark.slow
def test_lora_run_resume_exports_and_merge(tmp_path):
    from internlm_jax.checkpoint.hf import load_hf, save_hf
    from internlm_jax.peft import LoraWeight, load_adapters, merge_adapters, merge_lora
    from internlm_jax.train.merge_cli import main as merge_main

    cfg = _lora_cfg(tmp_path, "steps=2")
    dev = jax.devices()[:1]
    finetune(cfg, devices=dev)
    res = finetune(_lora_cfg(tmp_path), devices=dev)  # resumes at step 2
    assert res.train.start_step == 2 and res.train.final_step == 4
    params = res.params
    lora = [x for x in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, LoraWeight))
            if isinstance(x, LoraWeight)]
    assert len(lora) == 6 and all(float(jnp.abs(w.b).max()) > 0 for w in lora)  # adapters moved
    # Only adapters train: the frozen base equals the initial weights bit for bit.
    init = initial_params(cfg, res.train.model_config)
    for new, old in zip(lora, [x for x in jax.tree.leaves(init, is_leaf=lambda v: isinstance(v, LoraWeight))
                               if isinstance(x, LoraWeight)]):
        np.testing.assert_array_equal(np.asarray(new.base), np.asarray(old.base))
    assert res.memory["trainable_params"] == sum(w.a.size + w.b.size for w in lora)

    model = res.train.model_config
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 265, (2, 24)), jnp.int32)
    fwd = jax.jit(lambda p: forward(p, tokens, config=model)[0])
    want = np.asarray(fwd(params))
    # 1) merged export read back by the HF loader
    _, hf_params = load_hf(res.hf_dir, progress=False)
    np.testing.assert_allclose(np.asarray(fwd(hf_params)), want, atol=1e-5, rtol=0)
    # 2) PEFT and orbax adapter folders on the base
    base = jax.tree.map(lambda x: x.base if isinstance(x, LoraWeight) else x, params,
                        is_leaf=lambda v: isinstance(v, LoraWeight))
    for fmt in ("peft", "orbax"):
        adapters = load_adapters(f"{res.adapter_dir}/{fmt}", model)
        np.testing.assert_allclose(np.asarray(fwd(merge_lora(merge_adapters(base, adapters)))), want, atol=1e-5,
                                   rtol=0)
    # 3) `internlm-jax convert merge` of the PEFT adapters into an HF base folder
    save_hf(tmp_path / "base_hf", base, model, progress=False)
    assert merge_main(["--base", str(tmp_path / "base_hf"), "--adapter", f"{res.adapter_dir}/peft", "--out",
                       str(tmp_path / "merged"), "--quiet"]) == 0
    _, merged = load_hf(tmp_path / "merged", progress=False)
    np.testing.assert_allclose(np.asarray(fwd(merged)), want, atol=1e-5, rtol=0)
    with open(f"{res.adapter_dir}/peft/adapter_config.json") as f:
        assert json.load(f)["r"] == 4

    # A base of another shape: a clear error, exit code 1.
    small = get_preset("internlm2-tiny", hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    rng = np.random.default_rng(0)
    other = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * 0.02, jnp.float32), param_shapes(small),
                         is_leaf=lambda x: isinstance(x, tuple))
    save_hf(tmp_path / "other_hf", other, small, progress=False)
    assert merge_main(["--base", str(tmp_path / "other_hf"), "--adapter", str(tmp_path / "run"), "--out",
                       str(tmp_path / "bad"), "--quiet"]) == 1
    with pytest.raises(ConfigError, match="another shape"):
        load_adapters(f"{res.adapter_dir}/peft", small)
    with pytest.raises(ConfigError, match="another shape"):
        merge_adapters(other, load_adapters(f"{res.adapter_dir}/orbax", model))


@pytest.mark.slow
def test_qlora_on_a_sharded_mesh_matches_one_device(tmp_path):
    """Adapters and int4 leaves get their logical axes (finetune_axes): 8 devices as data=2, fsdp=2, tensor=2 train
    the same as one."""
    histories = []
    for name, mesh, devices in (("one", "mesh={data: 1}", jax.devices()[:1]),
                                ("eight", "mesh={data: 2, fsdp: 2, tensor: 2}", jax.devices()[:8])):
        cfg = _lora_cfg(tmp_path, f"output_dir={tmp_path / name}", "mode=qlora", "qlora.group_size=64", "steps=3",
                        "global_batch_size=8", "lora.dropout=0.0", "export.hf_dir=null", mesh)
        histories.append([r["loss"] for r in finetune(cfg, devices=devices).train.history])
    np.testing.assert_allclose(histories[1], histories[0], rtol=2e-5)
