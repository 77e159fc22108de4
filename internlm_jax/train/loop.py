"""The training loop shared by pre-training and fine-tuning.

    result = train(cfg)                      # pre-training from a TrainConfig
    result = train(cfg, hooks=TrainHooks(    # fine-tuning: own batches, loss and trainable leaves
        batch_source=..., loss_fn=..., trainable=lambda path, leaf: "lora" in path))

Per step: next batch -> global arrays sharded over (data, fsdp) -> jitted train step -> metrics. Metrics of step
s are read after step s+1 is dispatched, so the host never stalls the device. Checkpoints are async orbax saves
every `checkpoint_every` steps and at the end; a run restarted with the same output_dir resumes from the latest
complete checkpoint, with the data iterator where it was, so the resumed run sees exactly the same batches.

Outputs in output_dir: config.yaml (the resolved run config), metrics.jsonl (one line per step; see
`_record`), checkpoints/, loss_curve.png, summary.txt, and tensorboard/ when a TensorBoard writer is installed.
Only process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from internlm_jax.config import ConfigError, ModelConfig
from internlm_jax.data.byte_tokenizer import load_tokenizer
from internlm_jax.model import init_params, param_axes
from internlm_jax.runconfig import dump_yaml, to_dict
from internlm_jax.sharding import make_mesh
from internlm_jax.train.checkpointing import Checkpointer
from internlm_jax.train.config import TrainConfig
from internlm_jax.train.flops import peak_flops, train_flops_per_token
from internlm_jax.train.optimizer import PathPredicate, build_optimizer, trainable_mask
from internlm_jax.train.step import (
    LossFn,
    State,
    abstract_state,
    default_loss_fn,
    init_state,
    make_step_fns,
    put_batch,
)

# Fault injection for the resume tests: "kill_after_step:N" or "kill_during_save:N" sends this process SIGKILL
# right after step N completes, or right after the async save of step N was started (before it is finalized).
FAULT_ENV = "INTERNLM_JAX_FAULT"


class BatchSource(Iterator[dict[str, np.ndarray]]):
    """What the loop needs from a data iterator (the grain DataIterator and SyntheticBatches fit)."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


SourceFactory = Callable[[TrainConfig, ModelConfig, int, int], BatchSource]  # (cfg, model, process, processes)


@dataclasses.dataclass
class TrainHooks:
    """Extension points for fine-tuning (and tests). Every field is optional.

    batch_source / eval_source: build this process's batch iterator (defaults: the grain pre-training
        pipeline over cfg.data / cfg.eval_data).
    loss_fn: (params, batch, model_config) -> (numerator, denominator, aux sums incl. "ce_sum").
    trainable: (key path, leaf) -> bool; frozen leaves get no gradients and no optimizer state.
    init_params: (model_config, key) -> params: random init; also defines the param tree structure
        (e.g. LoRA-wrapped weights).
    param_axes: model_config -> logical axis names matching the params tree.
    load_params: (cfg, model_config, target) -> params for a fresh run, where target is the params tree of
        ShapeDtypeStructs with shardings (default: random init, or cfg.init_from).
    on_step: called on process 0 with each step's metric record.
    devices: build the mesh over these devices instead of all of them (tests, benchmarks).
    """

    batch_source: SourceFactory | None = None
    eval_source: SourceFactory | None = None
    loss_fn: LossFn | None = None
    trainable: PathPredicate | None = None
    init_params: Callable[[ModelConfig, jax.Array], Any] | None = None
    param_axes: Callable[[ModelConfig], Any] | None = None
    load_params: Callable[[TrainConfig, ModelConfig, Any], Any] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    devices: list[Any] | None = None


@dataclasses.dataclass
class TrainResult:
    output_dir: str
    model_config: ModelConfig
    start_step: int  # 0 for a fresh run, else the checkpoint step it resumed from
    final_step: int
    history: list[dict[str, Any]]  # the metric records of this process's run (steps start_step+1..final)
    state: State
    summary: str


# ---- data ------------------------------------------------------------------------------------------------
def ensure_synthetic_data(cfg: TrainConfig, data_cfg: Any) -> None:
    """With `generate_data: true`, write the synthetic corpus where a source path does not exist yet."""
    from internlm_jax.data.corpus import write_synthetic_corpus

    for i, src in enumerate(data_cfg.sources):
        if os.path.exists(src.path):
            continue
        if not cfg.generate_data:
            raise ConfigError(f"data source {src.path!r} does not exist. Fix the path, or set generate_data=true "
                              "to write a synthetic corpus there")
        if jax.process_index() == 0:
            directory, name = (os.path.dirname(src.path) or ".", os.path.basename(src.path)) \
                if src.path.endswith(".jsonl") else (src.path, "corpus.jsonl")
            write_synthetic_corpus(directory, cfg.synthetic_docs, seed=cfg.seed + i, filename=name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic data written")


def default_source(data_cfg: Any) -> SourceFactory:
    def make(cfg: TrainConfig, model: ModelConfig, process_index: int, process_count: int) -> BatchSource:
        from internlm_jax.data.pipeline import build_pretrain_pipeline

        ensure_synthetic_data(cfg, data_cfg)
        tok = load_tokenizer(data_cfg.tokenizer)
        vocab = int(tok.vocab_size)
        if vocab > model.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but the model's vocab_size is {model.vocab_size}; "
                              "set model.overrides.vocab_size or use a matching tokenizer")
        return build_pretrain_pipeline(data_cfg, tok, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                                       process_index=process_index, process_count=process_count)

    return make


# ---- params ------------------------------------------------------------------------------------------------
def load_initial_params(path: str, model: ModelConfig, target: Any, mesh: Any) -> Any:
    """Weights for continued pre-training: an HF folder, a params checkpoint, or a run of ours."""
    if not os.path.isdir(path):
        raise ConfigError(f"init_from {path!r} is not a folder (an HF checkpoint, an internlm-jax checkpoint or "
                          "a training run directory)")
    if os.path.exists(os.path.join(path, "config.json")):
        from internlm_jax.checkpoint.hf import load_hf

        _, params = load_hf(path, config=model, mesh=mesh, progress=jax.process_index() == 0)
    elif os.path.exists(os.path.join(path, "model_config.json")):
        from internlm_jax.checkpoint.orbax_io import read_config, restore_params
        from internlm_jax.train.checkpointing import check_same_model

        check_same_model(dataclasses.asdict(read_config(path)), model, path)
        _, params = restore_params(path, mesh=mesh, dtype=model.param_dtype)
    else:
        from internlm_jax.train.checkpointing import check_same_model, read_model_json, resolve_checkpoint

        directory, step = resolve_checkpoint(path)
        saved = read_model_json(path)
        if saved is not None:
            check_same_model(saved, model, f"{directory}/{step}")
        ck = Checkpointer(directory, read_only=True)
        try:
            params = ck.restore_params(step, target)
        finally:
            ck.close()
    return jax.tree.map(lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), params, target)


# ---- metrics ---------------------------------------------------------------------------------------------
class MetricsWriter:
    """metrics.jsonl (+ TensorBoard when importable) on process 0; resumed runs drop lines past the resume
    step so the file reads as one clean history."""

    def __init__(self, output_dir: str, start_step: int, tensorboard: bool) -> None:
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        kept: list[str] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= start_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        break  # a line cut by a crash ends the usable history
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        self.file = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed in close()
        if tensorboard:
            self.tb = _tensorboard_writer(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and type(v) in (int, float) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _tensorboard_writer(logdir: str) -> Any:
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            module = __import__(mod, fromlist=["SummaryWriter"])
            return module.SummaryWriter(logdir)
        except Exception:  # noqa: BLE001, S112 - not installed (torch's writer needs the tensorboard package)
            continue
    return None


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records if "loss" in r]
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train loss")
    ev = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the loop ----------------------------------------------------------------------------------------------
def _fault(kind: str, step: int, ckpt: Checkpointer) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"{kind}:{step}":
        if kind == "kill_after_step":
            ckpt.wait()  # a crash after step N with every started save complete
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns the history of this invocation and the final state."""
    hooks = hooks or TrainHooks()
    from internlm_jax.distributed import initialize

    initialize(cfg.distributed)  # no-op for a single process
    pid, nproc = jax.process_index(), jax.process_count()
    is_main = pid == 0
    model = cfg.model.build()
    mesh = make_mesh(cfg.mesh, hooks.devices)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.micro_batch_size % batch_shards:
        raise ConfigError(
            f"each micro-batch has global_batch_size/grad_accum = {cfg.micro_batch_size} rows, which does not split "
            f"over the data*fsdp = {batch_shards} batch shards of mesh {dict(mesh.shape)}; "
            "change global_batch_size, grad_accum or the mesh")
    if cfg.global_batch_size % nproc:
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} does not split over {nproc} processes")
    make_source = hooks.batch_source or (default_source(cfg.data) if cfg.data is not None else None)
    if make_source is None:
        raise ConfigError("no data: set the `data` section of the config (or pass a batch_source hook)")
    eval_source_fn = hooks.eval_source or (default_source(cfg.eval_data) if cfg.eval_data is not None else None)
    if cfg.eval_every and eval_source_fn is None:
        raise ConfigError("eval_every > 0 needs an eval_data section (a data config for held-out text)")
    out = os.path.abspath(cfg.output_dir)
    if is_main:
        os.makedirs(out, exist_ok=True)

    with contextlib.ExitStack() as cleanup:
        # The data first: a wrong path or tokenizer fails before anything compiles.
        source = make_source(cfg, model, pid, nproc)
        cleanup.callback(_close, source)

        # Optimizer, abstract state, jitted steps.
        tx, schedule = build_optimizer(cfg.optimizer, cfg.steps)
        init_fn = hooks.init_params or (lambda m, k: init_params(m, k))
        axes = (hooks.param_axes or param_axes)(model)
        abstract, mask = abstract_state(model, tx, lambda p: trainable_mask(p, hooks.trainable),
                                        lambda k: init_fn(model, k))
        loss_fn = hooks.loss_fn or default_loss_fn(cfg.z_loss, cfg.loss_chunk)
        fns = make_step_fns(model, tx, schedule, mesh, abstract, axes, mask, grad_accum=cfg.grad_accum,
                            loss_fn=loss_fn)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract,
                              fns.shardings)

        # Resume from the latest complete checkpoint, or start fresh (random or init_from weights).
        ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=cfg.keep_checkpoints,
                            async_save=cfg.async_checkpoint)
        cleanup.callback(ckpt.close)
        ckpt.check_model(model)
        start = ckpt.latest_step() or 0
        if start:
            state, saved_data = ckpt.restore(start, target)
            source.set_state(_own_data_state(saved_data, pid, nproc))
        else:
            if hooks.load_params is not None:
                params = hooks.load_params(cfg, model, target["params"])
            elif cfg.init_from:
                params = load_initial_params(cfg.init_from, model, target["params"], mesh)
            else:
                params = jax.jit(lambda k: init_fn(model, k), out_shardings=fns.shardings["params"])(
                    jax.random.key(cfg.seed))
            state = jax.jit(lambda p: init_state(p, tx, mask), out_shardings=fns.shardings,
                            donate_argnums=0)(params)
        if is_main:
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(dump_yaml(cfg))

        n_devices = mesh.devices.size
        peak, peak_note = peak_flops(model.dtype, n_devices, cfg.peak_tflops)
        writer = MetricsWriter(out, start, cfg.tensorboard and is_main)
        cleanup.callback(writer.close)
        bar = None
        if cfg.progress and is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
            cleanup.callback(bar.close)
        t_begin = time.perf_counter()
        state, history = _loop(cfg, model, fns, state, source, eval_source_fn, ckpt, writer, bar, hooks, start,
                               peak)

    summary = _summary(cfg, model, out, start, history, time.perf_counter() - t_begin, peak_note, dict(mesh.shape))
    if is_main:
        try:
            plot_loss(read_metrics(out), os.path.join(out, "loss_curve.png"))
        except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
            print(f"warning: could not draw the loss curve: {e}", file=sys.stderr)
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        print(summary)
    return TrainResult(out, model, start, cfg.steps, history, state, summary)


def _close(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (orbax writes JSON items from process 0
    only, and each process's data iterator is at its own position)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    every = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(every[i, : int(lengths[i, 0])]).decode()) for i in range(every.shape[0])]


def _own_data_state(saved: Any, pid: int, nproc: int) -> Any:
    if not isinstance(saved, dict) or "per_process" not in saved:
        raise ConfigError("the checkpoint's data item is not a per-process iterator state list")
    states = saved["per_process"]
    if len(states) != nproc and all(st == states[0] for st in states):
        # A source whose position is global (every process saved the same state, e.g. a stream that is a
        # pure function of the step) resumes under any process count.
        return states[0]
    if len(states) != nproc:
        raise ConfigError(f"the checkpoint was written by {len(states)} processes but this run has {nproc}; the "
                          "data-iterator positions cannot be mapped exactly (resume with the same process count)")
    return states[pid]


def _loop(cfg: TrainConfig, model: ModelConfig, fns: Any, state: State, source: BatchSource,
          eval_source_fn: SourceFactory | None, ckpt: Checkpointer, writer: MetricsWriter, bar: Any,
          hooks: TrainHooks, start: int, peak: float) -> tuple[State, list[dict[str, Any]]]:
    pid, nproc = jax.process_index(), jax.process_count()
    run_config = to_dict(cfg)
    history: list[dict[str, Any]] = []
    pending: tuple[int, dict[str, jax.Array], float] | None = None
    t_prev = time.perf_counter()
    seq_len = 0

    def flush(item: tuple[int, dict[str, jax.Array], float]) -> None:
        nonlocal t_prev
        step, m, data_time = item
        host = {k: float(v) for k, v in jax.device_get(m).items()}  # waits for that step
        now = time.perf_counter()
        step_time, t_prev = now - t_prev, now
        row_tokens = cfg.global_batch_size * seq_len
        flops = train_flops_per_token(model, seq_len) * row_tokens
        rec = {"step": step, "loss": host["loss"], "z_loss": host["z_loss"], "grad_norm": host["grad_norm"],
               "lr": host["lr"], "tokens": int(host["tokens"]), "step_time": step_time, "data_time": data_time,
               "tokens_per_s": row_tokens / step_time, "mfu": flops / step_time / peak, "compile": not history}
        rec.update({k: v for k, v in host.items() if k not in rec and k != "objective"})  # a loss's extra metrics
        history.append(rec)
        if pid == 0:
            if step % cfg.log_every == 0 or step == cfg.steps:
                writer.write(rec)
            if hooks.on_step is not None:
                hooks.on_step(rec)
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    # (step, state, data state) of the last step whose update returned: what an interrupt saves.
    done: tuple[int, State, Any] = (start, state, None)
    saved = start
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            raw = next(source)
            data_state = source.get_state()  # the state *after* this batch: what a resume continues from
            data_time = time.perf_counter() - t0
            seq_len = raw["tokens"].shape[1]
            state, metrics = fns.train(state, put_batch(raw, fns.batch_sharding))
            done = (step, state, data_state)
            if pending is not None:
                flush(pending)  # step-1 finished while step was queued behind it
            pending = (step, metrics, data_time)

            if cfg.eval_every and step % cfg.eval_every == 0 and eval_source_fn is not None:
                flush(pending)
                pending = None
                ev = evaluate(fns, state["params"], eval_source_fn(cfg, model, pid, nproc), cfg.eval_batches)
                history[-1]["eval_loss"] = ev
                if pid == 0:
                    writer.write({"step": step, "eval_loss": ev})
                t_prev = time.perf_counter()  # eval time is not step time

            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                ckpt.save(step, state, data_state={"per_process": _gather_json(data_state)},
                          run_config=run_config, model=model)
                saved = step
                _fault("kill_during_save", step, ckpt)
            _fault("kill_after_step", step, ckpt)
        if pending is not None:
            flush(pending)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        raise KeyboardInterrupt(_save_on_interrupt(ckpt, done, saved, run_config, model, cfg.output_dir)) from None
    return state, history


def _save_on_interrupt(ckpt: Checkpointer, done: tuple[int, State, Any], saved: int, run_config: dict[str, Any],
                       model: ModelConfig, output_dir: str) -> str:
    """Ctrl-C in the loop: save the last completed step (synchronously) unless it is already saved; return the
    one line that says where a rerun resumes."""
    step, state, data_state = done
    where = os.path.join(output_dir, "checkpoints")
    if step > saved and jax.process_count() == 1 and data_state is not None and \
            not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state)):
        try:
            ckpt.save(step, state, data_state={"per_process": [data_state]}, run_config=run_config, model=model)
            ckpt.wait()
            return (f"interrupted after step {step}: checkpoint saved in {where}; run the same command to "
                    f"resume from step {step}")
        except KeyboardInterrupt:  # a second Ctrl-C: leave now (a half-written step is never used)
            pass
    else:
        ckpt.wait()
    last = ckpt.latest_step()
    if last:
        return (f"interrupted after step {step}: no new checkpoint written; run the same command to resume from "
                f"step {last} ({where})")
    return f"interrupted after step {step}: no checkpoint yet; the same command starts again from step 0"


def evaluate(fns: Any, params: Any, source: BatchSource, batches: int) -> float:
    ce, n = 0.0, 0.0
    try:
        for _ in range(batches):
            try:
                raw = next(source)
            except StopIteration:
                break
            m = jax.device_get(fns.eval(params, put_batch(raw, fns.batch_sharding)))
            ce += float(m["ce_sum"])
            n += float(m["tokens"])
    finally:
        _close(source)
    return ce / max(n, 1.0)


def _summary(cfg: TrainConfig, model: ModelConfig, out: str, start: int, history: list[dict[str, Any]],
             wall: float, peak_note: str, mesh_shape: dict[str, int]) -> str:
    n_devices = int(np.prod(list(mesh_shape.values())))
    steady = [r for r in history if not r["compile"]] or history
    tok_s = float(np.mean([r["tokens_per_s"] for r in steady])) if steady else float("nan")
    mfu = float(np.mean([r["mfu"] for r in steady])) if steady else float("nan")
    losses = [r["loss"] for r in history]
    evals = [r["eval_loss"] for r in history if r.get("eval_loss") is not None]
    lines = [
        "=" * 64,
        f"run        {out}",
        (f"model      {cfg.model.name}  ({model.num_params() / 1e6:.2f}M params, compute {model.dtype}, "
         f"params {model.param_dtype}, remat {model.remat})"),
        f"steps      {start} -> {cfg.steps}" + (f"  (resumed from step {start})" if start else ""),
        (f"devices    {n_devices}  processes {jax.process_count()}  mesh "
         + " ".join(f"{k}={v}" for k, v in mesh_shape.items())),
    ]
    if losses:
        lines += [
            f"loss       first {losses[0]:.4f}  last {losses[-1]:.4f}  min {min(losses):.4f}",
            f"throughput {tok_s:,.0f} tokens/s  MFU {100 * mfu:.1f}%  (steady steps; peak: {peak_note})",
            f"compile    first step {history[0]['step_time']:.1f}s   wall {wall:.1f}s",
        ]
    if evals:
        lines.append(f"eval loss  last {evals[-1]:.4f}")
    lines += ["outputs    metrics.jsonl  loss_curve.png  config.yaml  checkpoints/", "=" * 64]
    return "\n".join(lines)
