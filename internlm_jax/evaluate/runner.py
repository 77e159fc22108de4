"""Runs: models x tasks from a YAML config, with cached predictions, resume, results JSON and a summary.

    cfg = load_eval_config("configs/eval/sample.yaml", ["work_dir=/tmp/ev"])
    results = run_eval(cfg)

Per (model, task): the prediction cache is read, only the missing items go through the inferencer (in
groups of `save_every`, each group appended to the cache before the next starts), then the metrics are
computed from all cached records. A model is only loaded if some task still has missing items.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from internlm_jax.config import ConfigError
from internlm_jax.evaluate.cache import PredictionCache, _safe
from internlm_jax.evaluate.inferencers import run_inferencer
from internlm_jax.evaluate.models import EvalModel
from internlm_jax.evaluate.needle import NeedleConfig, run_needle
from internlm_jax.evaluate.scoring import score_task
from internlm_jax.evaluate.summary import write_summary
from internlm_jax.evaluate.tasks import Task, TaskConfig, _expand_env, load_task
from internlm_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Literal["local", "openai"] = "local"
    # local: an HF folder or orbax checkpoint (`path`), or random weights of a preset (`preset`, for demos)
    path: str | None = None
    preset: str | None = None
    seed: int = 0
    tokenizer: str | None = None  # tokenizer folder (default: the checkpoint folder)
    dtype: str | None = None
    batch_size: int = 8
    max_length: int | None = None  # default: the model's context
    max_context: int | None = None  # allow inputs beyond the trained context (dynamic-NTK extrapolation)
    mesh: MeshConfig | None = None  # shard params and batches over devices (e.g. {data: -1} or {tensor: 8})
    quant: Literal["none", "int4"] = "none"  # int4 weight-only round-to-nearest at load time
    quant_group_size: int = 128
    generator: Literal["lm", "engine"] = "lm"  # generation by LM.generate or by the serving engine
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)  # EngineConfig fields (generator: engine)
    # openai: any OpenAI-compatible endpoint
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout: float = 600.0
    scoring_max_tokens: int = 0  # 1 for servers that reject max_tokens=0 with echo

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ConfigError(f"model name {self.name!r} may only hold letters, digits, '_', '.', '-' (it names "
                              "folders and table columns)")
        for field in ("path", "tokenizer"):
            value = getattr(self, field)
            if value and "${" in value:
                var = value[value.index("${") + 2:].split("}", 1)[0]
                raise ConfigError(f"model {self.name!r}: {field} is {value!r} but ${var} is not set. Set it to a "
                                  f"checkpoint folder, e.g. `{var}=runs/demo/sft/hf internlm-jax eval ...` (the "
                                  "demo's fine-tuned model), or override it: models.0.path=/path/to/checkpoint")
        if self.kind == "local" and (self.path is None) == (self.preset is None):
            raise ConfigError(f"model {self.name!r}: a local model needs exactly one of path (a checkpoint) or "
                              "preset (random weights)")
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ConfigError(f"model {self.name!r}: an openai model needs base_url (e.g. "
                              "http://127.0.0.1:8000/v1) and model (the served model name)")
        if self.batch_size < 1:
            raise ConfigError(f"model {self.name!r}: batch_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    work_dir: str
    models: tuple[ModelSpec, ...]
    tasks: tuple[TaskConfig | str, ...] = ()
    needle: NeedleConfig | None = None
    save_every: int = 32  # items per cache append (the most work lost to an interruption)
    bar_chart: bool = True

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models is empty: list at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}")
        if not self.tasks and self.needle is None:
            raise ConfigError("nothing to evaluate: give tasks and/or needle")
        if self.save_every < 1:
            raise ConfigError("save_every must be >= 1")


def load_eval_config(path: str | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """YAML -> EvalConfig. `${VAR}` in strings is expanded from the environment; key=value overrides."""
    from internlm_jax.runconfig import apply_overrides, from_dict, read_yaml

    data = _expand_env(read_yaml(path)) if path else {}
    return from_dict(EvalConfig, apply_overrides(data, overrides))


def build_model(spec: ModelSpec) -> EvalModel:
    if spec.kind == "openai":
        from internlm_jax.evaluate.openai_client import OpenAIModel, from_env_key

        return OpenAIModel(spec.base_url or "", spec.model or "", name=spec.name, tokenizer=spec.tokenizer,
                           api_key=from_env_key(spec.api_key_env), batch_size=spec.batch_size,
                           max_length=spec.max_length or 4096, timeout=spec.timeout,
                           scoring_max_tokens=spec.scoring_max_tokens)
    import internlm_jax as ij
    from internlm_jax.evaluate.models import LocalModel
    from internlm_jax.sharding import make_mesh

    mesh = make_mesh(spec.mesh) if spec.mesh is not None else None
    lm = ij.load(spec.preset if spec.preset is not None else spec.path, dtype=spec.dtype, tokenizer=spec.tokenizer,
                 mesh=mesh, quant=spec.quant, quant_group_size=spec.quant_group_size, max_context=spec.max_context,
                 random_weights=spec.preset is not None, seed=spec.seed)
    generator = None
    if spec.generator == "engine":
        from internlm_jax.engine import Engine, EngineConfig
        from internlm_jax.evaluate.models import EngineGenerator
        from internlm_jax.runconfig import from_dict

        engine_cfg = from_dict(EngineConfig, spec.engine, f"models.{spec.name}.engine")
        generator = EngineGenerator(Engine(lm.params, lm.config, engine_cfg, tokenizer=lm.tokenizer, mesh=lm.mesh),
                                    lm.tokenizer)
    return LocalModel(lm, name=spec.name, batch_size=spec.batch_size, max_length=spec.max_length,
                      generator=generator)


@dataclasses.dataclass
class TaskRun:
    task: Task
    records: list[dict[str, Any]]
    computed: int  # items run through the model in this call (the rest came from the cache)
    stale: bool


def evaluate_task(task: Task, model: EvalModel | Callable[[], EvalModel], work_dir: str, model_name: str, *,
                  save_every: int = 32, progress: bool = False) -> TaskRun:
    """Predictions for every item of `task`, computing only those missing from the cache."""
    cache = PredictionCache(work_dir, model_name, task.name, task.version)
    done = cache.load()
    todo = [i for i in range(len(task)) if i not in done]
    computed = 0
    if todo:
        m = model if isinstance(model, EvalModel) else model()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(task), initial=len(done), desc=f"{model_name} / {task.name}", leave=False)
        for s in range(0, len(todo), save_every):
            chunk = todo[s: s + save_every]
            recs = run_inferencer(task, m, chunk)
            cache.append(recs)
            for r in recs:
                done[r["idx"]] = r
            computed += len(chunk)
            _maybe_fault(computed)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    return TaskRun(task, [done[i] for i in range(len(task))], computed, cache.stale)


# Fault injection for the resume test: "kill_after_items:N" SIGKILLs this process once N items of a task are
# in the cache (a real, uncatchable kill at a deterministic point, instead of racing a timer).
FAULT_ENV = "INTERNLM_JAX_EVAL_FAULT"


def _maybe_fault(computed: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("kill_after_items:") and computed >= int(spec.split(":", 1)[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def run_eval(config: EvalConfig, *, models: Mapping[str, EvalModel] | None = None, base_dir: str | None = None,
             progress: bool = True,
             on_error: Callable[[str, str, Exception], None] | None = None) -> dict[str, Any]:
    """Evaluate every model on every task; write predictions, results and the summary into work_dir.

    A task that cannot be run on a model (ConfigError/ValueError: e.g. CLP choices that share every token) does
    not stop the run: its message is kept in results["tasks"][task]["errors"][model] (and passed to
    `on_error(model, task, exc)`), the summary shows `error` there, and the other tasks are evaluated. A crash
    (any other exception) stops the run, which resumes from its prediction cache; so does a model that cannot be
    built.

    `models` may supply ready EvalModel objects by name (tests, notebooks); others are built from the spec.
    Returns the results dict also written to {work_dir}/results.json.
    """
    os.makedirs(config.work_dir, exist_ok=True)
    tasks = [load_task(t, base_dir) for t in config.tasks]
    if len({t.name for t in tasks}) != len(tasks):
        raise ConfigError(f"task names must be unique, got {[t.name for t in tasks]}")
    results: dict[str, Any] = {"models": [m.name for m in config.models], "tasks": {}, "needle": {}}
    for t in tasks:
        results["tasks"][t.name] = {"version": t.version, "mode": t.mode, "format": t.config.format,
                                    "num_samples": len(t), "metrics": {}, "computed": {}}
    for spec in config.models:
        holder: dict[str, Any] = {}

        def get_model(spec: ModelSpec = spec, holder: dict[str, Any] = holder) -> EvalModel:
            if "m" not in holder:
                try:
                    holder["m"] = models[spec.name] if models and spec.name in models else build_model(spec)
                except BaseException:
                    holder["build_failed"] = True
                    raise
            return holder["m"]

        for t in tasks:
            entry = results["tasks"][t.name]
            try:
                run = evaluate_task(t, get_model, config.work_dir, spec.name, save_every=config.save_every,
                                    progress=progress)
                scores, details = score_task(t, run.records)
            except (ConfigError, ValueError) as e:  # the task cannot be run on this model; a crash propagates
                if holder.get("build_failed"):
                    raise  # the model itself could not be built: every task would fail the same way
                # One task's failure (a format this model's tokenizer cannot score, a bad data file) is
                # reported and the other tasks still run.
                entry.setdefault("errors", {})[spec.name] = f"{type(e).__name__}: {e}"
                if on_error is not None:
                    on_error(spec.name, t.name, e)
                else:
                    print(f"warning: task {t.name!r} failed for model {spec.name!r} ({e}); it shows as `error` in "
                          "the summary and the other tasks go on", file=sys.stderr, flush=True)
                continue
            entry["metrics"][spec.name] = scores
            entry["computed"][spec.name] = run.computed
            rdir = os.path.join(config.work_dir, "results", _safe(spec.name))
            os.makedirs(rdir, exist_ok=True)
            with open(os.path.join(rdir, f"{_safe(t.name)}.json"), "w") as f:
                json.dump({"task": t.name, "version": t.version, "mode": t.mode, "metrics": scores,
                           "num_samples": len(t), "computed": run.computed}, f, indent=2)
            if details:
                with open(os.path.join(rdir, f"{_safe(t.name)}.details.jsonl"), "w") as f:
                    f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in details)
        if config.needle is not None:
            out_dir = os.path.join(config.work_dir, "needle", _safe(spec.name))
            results["needle"][spec.name] = run_needle(get_model(), config.needle, out_dir, base_dir=base_dir)
    with open(os.path.join(config.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    write_summary(results, config.work_dir, bar_chart=config.bar_chart)
    return results
