"""Fine-tuning on the pre-training loop: SFT or DPO, with full weights, LoRA or QLoRA.

    from internlm_jax.runconfig import load_config
    from internlm_jax.train.finetune import FinetuneConfig, finetune
    result = finetune(load_config(FinetuneConfig, "configs/finetune/tiny_lora.yaml"))

The data stage (`internlm_jax.data.sft` / `.dpo`) renders chats with the InternLM2 template, masks the loss to
the assistant's tokens and packs samples into rows; then `train.loop.train` runs with hooks that only change
what the loop needs to know:
- the params tree: full -> the model's params; lora -> `LoraWeight` at the targets (frozen dense base + A, B);
  qlora -> the layer weights as int4 `QuantizedLinear` under the adapters;
- which leaves train (LoRA: only A and B, so AdamW keeps state for the adapters alone);
- the logical axes of every leaf (adapters follow their base's in / out axes, rank `lora_rank`; int4 leaves
  are replicated apart from the layer axis);
- how the first params are made: base weights from `init_from` (HF folder, params checkpoint or run) or
  random, then quantised / wrapped; for DPO the reference log-probs are computed right after;
- the loss: next-token cross-entropy over the loss mask (SFT), or DPO / IPO.
After training: LoRA adapters are saved (PEFT folder by default), and `export.hf_dir` gets an HF folder (the
full weights, or adapters merged into the base). The run folder also gets data_report.json and memory.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.data.sft import DataReport, PackedBatches, Unit, load_chat_tokenizer, load_units
from internlm_jax.model import init_params, param_axes, param_shapes
from internlm_jax.train.finetune_config import (
    DPOConfig,
    ExportConfig,
    FinetuneConfig,
    LoraConfig,
    QLoraConfig,
)
from internlm_jax.train.loop import TrainHooks, TrainResult, load_initial_params, train
from internlm_jax.train.step import LossFn, default_loss_fn

__all__ = ["DPOConfig", "ExportConfig", "FinetuneConfig", "FinetuneResult", "LoraConfig", "QLoraConfig",
           "base_weights", "build_model", "build_params_fn", "chat_accuracy", "export_hf", "finetune", "finetune_axes",
           "initial_params", "prepare_data"]


@dataclasses.dataclass
class FinetuneResult:
    train: TrainResult
    data_report: DataReport
    adapter_dir: str | None
    hf_dir: str | None
    memory: dict[str, int]

    @property
    def params(self) -> Any:
        return self.train.state["params"]


# ---- params -------------------------------------------------------------------------------------------------
def build_params_fn(cfg: FinetuneConfig) -> Callable[[Any, ModelConfig, jax.Array], Any]:
    """(dense params, model config, key) -> the params tree of cfg.mode."""
    from internlm_jax.peft import apply_lora
    from internlm_jax.quant.int4 import LAYER_TARGETS, quantize_params

    def transform(params: Any, model: ModelConfig, key: jax.Array) -> Any:
        if cfg.mode == "qlora":
            params = quantize_params(params, model, group_size=cfg.qlora.group_size,
                                     zero_point=cfg.qlora.zero_point, targets=LAYER_TARGETS)
        if cfg.mode in ("lora", "qlora"):
            params = apply_lora(params, model, targets=cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                key=key, dropout=cfg.lora.dropout, dtype=jnp.dtype(cfg.lora.dtype))
        return params

    return transform


def _keys(path: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """(dict keys, then attribute names) of a key path: (['layers', 'wqkv'], ['base', 'weight', 'packed'])."""
    dict_keys, attrs = [], []
    for k in path:
        if hasattr(k, "key"):
            dict_keys.append(str(k.key))
        else:
            attrs.append(str(getattr(k, "name", k)))
    return dict_keys, attrs


def finetune_axes(abstract_params: Any, model: ModelConfig) -> Any:
    """Logical axis names for every leaf of a (LoRA / int4) params tree, same structure."""
    from internlm_jax.quant.int4 import LINEAR_AXES

    base = param_axes(model)

    def rule(path: tuple[Any, ...], leaf: Any) -> tuple[str | None, ...]:
        dict_keys, attrs = _keys(path)
        names = base
        for k in dict_keys:
            names = names[k]
        names = tuple(names)
        if not attrs:
            return names
        lead = 1 if dict_keys[0] == "layers" else 0
        in_ndim = len(LINEAR_AXES[dict_keys[-1]][0])
        if attrs[0] == "a":
            return names[: lead + in_ndim] + ("lora_rank",)
        if attrs[0] == "b":
            return names[:lead] + ("lora_rank",) + names[lead + in_ndim:]
        if attrs[0] == "base":
            attrs = attrs[1:]
            if not attrs:
                return names
        # int4 leaves (packed [.., Din/2, Dout], scales / zeros [.., Din/g, Dout], input_scale [.., Din]):
        # replicated but for the layer axis (the int4 base of a 7B model is ~4 GB).
        return names[:lead] + (None,) * (len(leaf.shape) - lead)

    return jax.tree_util.tree_map_with_path(rule, abstract_params)


_init_jit = jax.jit(init_params, static_argnums=0)  # compiled once per ModelConfig (hashable)


def initial_params(cfg: FinetuneConfig, model: ModelConfig, target: Any = None) -> Any:
    """The params a fresh run starts from: base weights (`base_weights(cfg)`, else random with cfg.seed),
    quantised / wrapped for cfg.mode (adapters drawn from cfg.seed), placed like `target` (abstract params with
    shardings) or on the default device."""
    from internlm_jax.sharding import make_mesh

    key = jax.random.key(cfg.seed)
    mesh = jax.tree.leaves(target)[0].sharding.mesh if target is not None else make_mesh(devices=jax.devices()[:1])
    weights = base_weights(cfg)
    if weights is None:
        dense = _init_jit(model, jax.random.fold_in(key, 0))
    else:
        dense = load_initial_params(weights, model, _dense_target(model, mesh), mesh)
    params = build_params_fn(cfg)(dense, model, jax.random.fold_in(key, 1))
    if target is None:
        return params
    return jax.tree.map(lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), params, target)


def _dense_target(model: ModelConfig, mesh: Any) -> Any:
    from internlm_jax.sharding import tree_shardings

    shapes = param_shapes(model)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    sh = tree_shardings(mesh, param_axes(model), shapes)
    dtype = jnp.dtype(model.param_dtype)
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s, dtype, sharding=h), shapes, sh, is_leaf=is_shape)


def build_model(cfg: FinetuneConfig) -> ModelConfig:
    """cfg.model.build(), with a clear error for a model folder that is not there."""
    name = cfg.model.name
    if (os.sep in name or name.startswith(".")) and not os.path.isdir(name):
        raise ConfigError(f"model.name {name!r} is not a folder: point it at the model's HF checkpoint (config.json, "
                          "tokenizer.model, *.safetensors), e.g. model.name=/path/to/internlm2-chat-7b, or name a "
                          "preset (internlm2-chat-7b gives the architecture only)")
    return cfg.model.build()


def base_weights(cfg: FinetuneConfig) -> str | None:
    """Where the base weights come from: init_from, else model.name when it is a folder, else None (random)."""
    if cfg.init_from:
        return cfg.init_from
    return cfg.model.name if os.path.isdir(cfg.model.name) else None


# ---- data ---------------------------------------------------------------------------------------------------
def prepare_data(cfg: FinetuneConfig, model: ModelConfig) -> tuple[Any, list[Unit], DataReport, list[Unit] | None]:
    """(tokenizer, training units, report, eval units)."""
    assert cfg.dataset is not None
    model_dir = base_weights(cfg)
    tok_dir = model_dir if model_dir and os.path.exists(os.path.join(model_dir, "tokenizer.model")) else None
    tokenizer = load_chat_tokenizer(cfg.dataset.tokenizer, tok_dir)
    units, report = load_units(cfg.dataset, tokenizer, task=cfg.task, vocab_size=model.vocab_size)
    eval_units = None
    if cfg.eval_dataset is not None:
        eval_units, _ = load_units(cfg.eval_dataset, tokenizer, task=cfg.task, vocab_size=model.vocab_size)
    return tokenizer, units, report, eval_units


def _tokenizer_dir(cfg: FinetuneConfig) -> str | None:
    if cfg.export.tokenizer_dir:
        return cfg.export.tokenizer_dir
    for cand in (cfg.dataset.tokenizer if cfg.dataset else None, base_weights(cfg)):
        if cand and os.path.exists(os.path.join(cand, "tokenizer.model")):
            return cand
    return None


# ---- losses -------------------------------------------------------------------------------------------------
def make_loss(cfg: FinetuneConfig) -> LossFn:
    if cfg.task == "dpo":
        from internlm_jax.train.dpo import make_dpo_loss

        base = make_dpo_loss(cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing, cfg.dpo.reference,
                             cfg.loss_chunk)
    else:
        base = default_loss_fn(cfg.z_loss, cfg.loss_chunk)
    if cfg.mode == "full" or cfg.lora.dropout <= 0:
        return base
    from internlm_jax.peft import enable_dropout

    def with_dropout(params, batch, model):
        if "rng_seed" not in batch:  # evaluation: no dropout
            return base(params, batch, model)
        # A fresh dropout mask per micro-batch: the key comes from the batch's own seed (set by the data
        # iterator from epoch, batch and row), so a resumed run draws the same masks.
        key = jax.random.fold_in(jax.random.key(cfg.seed), batch["rng_seed"][0, 0])
        return base(enable_dropout(params, key), batch, model)

    return with_dropout


class _SeededBatches:
    """Adds `rng_seed` [B, T] (one value per row: epoch, batch, row) for LoRA dropout."""

    def __init__(self, inner: PackedBatches) -> None:
        self.inner = inner

    def __iter__(self) -> _SeededBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        import numpy as np

        epoch, batch = self.inner.epoch, self.inner.batch
        out = next(self.inner)
        rows, T = out["tokens"].shape
        base = (epoch * 1_000_003 + batch) * 65_537 + self.inner.process_index * rows
        out["rng_seed"] = np.broadcast_to((base + np.arange(rows, dtype=np.int64))[:, None] % (2**31 - 1),
                                          (rows, T)).astype(np.int32)
        return out

    def get_state(self) -> Any:
        return self.inner.get_state()

    def set_state(self, state: Any) -> None:
        self.inner.set_state(state)


# ---- the run ------------------------------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig, *, devices: list[Any] | None = None,
             on_step: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Prepare the data, train (or resume) on the training loop, save adapters and exports."""
    from internlm_jax.peft import is_adapter_path, param_memory_report

    model = build_model(cfg)
    tokenizer, units, report, eval_units = prepare_data(cfg, model)
    out = os.path.abspath(cfg.output_dir)
    is_main = jax.process_index() == 0
    dpo = cfg.task == "dpo"
    precompute = dpo and cfg.dpo.reference == "precompute"
    ref_file = os.path.join(out, "dpo_reference.npz")
    pack_kw: dict[str, Any] = {"pad_id": int(tokenizer.pad_id), "pack": cfg.dataset.pack, "dpo": dpo,
                               "max_units_per_row": cfg.dpo.max_pairs_per_row if dpo else 0}

    probe = PackedBatches(units, cfg.dataset.seq_len, cfg.global_batch_size, seed=cfg.seed,
                          shuffle=cfg.dataset.shuffle, **pack_kw)
    per_epoch = probe.batches_per_epoch(0)
    if cfg.epochs is not None:
        cfg = dataclasses.replace(cfg, steps=cfg.epochs * per_epoch)
    rows = len(probe.rows_for_epoch(0))
    fill = sum(probe.lengths) / max(rows * cfg.dataset.seq_len, 1)
    if is_main:
        print(f"data: {report.summary()}\n      {rows} rows of {cfg.dataset.seq_len} ({100 * fill:.1f}% filled), "
              f"{per_epoch} batches of {cfg.global_batch_size} per epoch; {cfg.steps} steps = "
              f"{cfg.steps / per_epoch:.2f} epochs")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "data_report.json"), "w") as f:
            json.dump({**report.as_dict(), "rows": rows, "fill": fill, "batches_per_epoch": per_epoch}, f,
                      indent=2)

    def batch_source(c: Any, m: ModelConfig, pid: int, nproc: int) -> Any:
        if precompute and _has_checkpoints(out):  # a resumed run: the log-probs computed at its start
            from internlm_jax.train.dpo import load_reference

            load_reference(ref_file, units)
            if eval_units is not None:
                load_reference(ref_file.replace(".npz", "_eval.npz"), eval_units)
        src = PackedBatches(units, cfg.dataset.seq_len, cfg.global_batch_size, seed=cfg.seed,
                            shuffle=cfg.dataset.shuffle, process_index=pid, process_count=nproc, **pack_kw)
        return _SeededBatches(src) if cfg.mode != "full" and cfg.lora.dropout > 0 else src

    def eval_source(c: Any, m: ModelConfig, pid: int, nproc: int) -> Any:
        assert eval_units is not None and cfg.eval_dataset is not None
        src = PackedBatches(eval_units, cfg.eval_dataset.seq_len, cfg.global_batch_size, seed=cfg.seed,
                            shuffle=False, repeat=False, process_index=pid, process_count=nproc, **pack_kw)
        return src

    transform = build_params_fn(cfg)
    init_fn = lambda m, k: transform(init_params(m, jax.random.fold_in(k, 0)), m, jax.random.fold_in(k, 1))
    abstract = jax.eval_shape(lambda k: init_fn(model, k), jax.random.key(0))
    weights = base_weights(cfg)
    if weights is not None and not os.path.isdir(weights):
        raise ConfigError(f"the base weights {weights!r} (init_from) do not exist: give an HF folder, an internlm-jax "
                          "params checkpoint or a training run (`internlm-jax train --config "
                          "configs/pretrain/tiny.yaml` writes runs/tiny), or init_from=null for random weights")

    def load_params(c: Any, m: ModelConfig, target: Any) -> Any:
        if weights is None and is_main:
            print(f"note: no base weights (init_from unset and model.name {cfg.model.name!r} is a preset): "
                  "starting from random weights")
        params = initial_params(cfg, m, target)
        if precompute:
            _precompute(params, m, jax.tree.leaves(target)[0].sharding.mesh)
        return params

    def _precompute(params: Any, m: ModelConfig, mesh: Any) -> None:
        from internlm_jax.train.dpo import precompute_reference, save_reference

        for us, path, seq_len in ((units, ref_file, cfg.dataset.seq_len),
                                  (eval_units, ref_file.replace(".npz", "_eval.npz"),
                                   cfg.eval_dataset.seq_len if cfg.eval_dataset else 0)):
            if us is None:
                continue
            precompute_reference(params, m, us, seq_len, cfg.micro_batch_size, pad_id=int(tokenizer.pad_id),
                                 chunk=cfg.loss_chunk, progress=cfg.progress and is_main)
            if is_main:
                save_reference(path, us)

    if precompute and not os.path.exists(ref_file) and _has_checkpoints(out):
        raise ConfigError(f"{out} has checkpoints but no {os.path.basename(ref_file)}: the reference log-probs of "
                          "this DPO run are gone, so it cannot resume; start in a new output_dir")

    hooks = TrainHooks(
        batch_source=batch_source, eval_source=eval_source if eval_units is not None else None,
        loss_fn=make_loss(cfg), trainable=is_adapter_path if cfg.mode != "full" else None,
        init_params=init_fn, param_axes=lambda m: finetune_axes(abstract, m), load_params=load_params,
        on_step=on_step, devices=devices)
    result = train(cfg, hooks)

    params = result.state["params"]
    memory = param_memory_report(params)
    adapter_dir = hf_dir = None
    if cfg.mode != "full":
        adapter_dir = _save_adapters(cfg, params, model, weights)
    if cfg.export.hf_dir:
        hf_dir = export_hf(os.path.join(out, cfg.export.hf_dir), params, model, tokenizer_dir=_tokenizer_dir(cfg),
                           dtype=cfg.export.dtype)
    if is_main:
        _write_memory(cfg, model, memory, out)
    return FinetuneResult(result, report, adapter_dir, hf_dir, memory)


def _has_checkpoints(out: str) -> bool:
    d = os.path.join(out, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _save_adapters(cfg: FinetuneConfig, params: Any, model: ModelConfig, base: str | None) -> str | None:
    from internlm_jax.peft import save_adapters

    folder = os.path.join(os.path.abspath(cfg.output_dir), cfg.export.adapter_dir or "adapter")
    if jax.process_index() != 0:
        return folder
    formats = ["peft", "orbax"] if cfg.export.adapter_format == "both" else [cfg.export.adapter_format]
    for fmt in formats:
        dest = folder if len(formats) == 1 else os.path.join(folder, fmt)
        save_adapters(dest, params, model, format=fmt, overwrite=True,
                      base_model_name_or_path=os.path.abspath(base) if base else None)
    print(f"adapters saved to {folder} ({', '.join(formats)})")
    return folder


def export_hf(path: str, params: Any, model: ModelConfig, *, tokenizer_dir: str | None = None,
              dtype: str | None = None) -> str:
    """Write an HF InternLM2 folder: LoRA adapters are merged (an int4 QLoRA base dequantised first, so the
    export computes what was trained), other int4 weights dequantised."""
    from internlm_jax.checkpoint.hf import save_hf
    from internlm_jax.peft import merge_lora
    from internlm_jax.quant.int4 import dequantize_params

    dense = dequantize_params(merge_lora(params))
    save_hf(path, dense, model, tokenizer_dir=tokenizer_dir, dtype=dtype, overwrite=True,
            progress=jax.process_index() == 0)
    if tokenizer_dir is None and jax.process_index() == 0:
        print(f"note: {path} has no tokenizer files (the run used no tokenizer folder); copy tokenizer.model "
              "and tokenizer_config.json there to load it with a tokenizer", file=sys.stderr)
    return os.path.abspath(path)


def _write_memory(cfg: FinetuneConfig, model: ModelConfig, measured: dict[str, int], out: str) -> None:
    from internlm_jax.peft import format_memory_table, memory_comparison

    rows = memory_comparison(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, group_size=cfg.qlora.group_size,
                             targets=cfg.lora.targets, base_dtype=model.param_dtype,
                             adapter_dtype=cfg.lora.dtype)
    mib = lambda n: f"{n / 2**20:.2f} MiB"
    text = (format_memory_table(rows, f"parameter memory of {cfg.model.name} (shapes only)") + "\n\n"
            f"measured in this run ({cfg.mode}): params {mib(measured['total'])}, frozen {mib(measured['frozen'])}, "
            f"trainable {mib(measured['trainable'])} ({measured['trainable_params']:,} params), int4 "
            f"{mib(measured['int4'])}\n")
    with open(os.path.join(out, "memory.md"), "w") as f:
        f.write(text)
    print(text)


def chat_accuracy(params: Any, model: ModelConfig, tokenizer: Any, records: list[dict[str, Any]], *,
                  max_new_tokens: int = 16, batch: int = 64) -> tuple[float, list[tuple[str, str]]]:
    """Exact-match accuracy of greedy answers: each record's messages up to its last assistant turn form the
    prompt (InternLM2 template + generation prompt), the last assistant content is the reference.
    Returns (accuracy, [(answer, reference)])."""
    from internlm_jax.api import LM
    from internlm_jax.chat import encode_chat

    prompts, refs = [], []
    for r in records:
        msgs = r["messages"]
        k = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(encode_chat(tokenizer, msgs[:k], tools=r.get("tools")))
        refs.append(msgs[k]["content"])
    lm = LM(model, params, tokenizer)
    answers: list[str] = []
    for i in range(0, len(prompts), batch):
        answers += lm.generate(prompts[i: i + batch], max_new_tokens, stop_token_ids=[tokenizer.im_end_id])
    pairs = list(zip(answers, refs))
    return sum(a.strip() == b.strip() for a, b in pairs) / max(len(pairs), 1), pairs
