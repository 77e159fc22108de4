"""Evaluation like OpenCompass: tasks (local data + prompt + inferencer + metric), likelihood and generation
inferencers over any EvalModel (a local `ij.LM` or an OpenAI-compatible endpoint), cached predictions with
resume, summaries, and needle in a haystack. Entry point: `internlm-jax eval` (evaluate/cli.py)."""

from internlm_jax.evaluate.likelihood import Scorer, ScoreResult, rolling_windows, split_context_continuation
from internlm_jax.evaluate.models import EngineGenerator, EvalModel, LocalModel, RollingResult
from internlm_jax.evaluate.needle import NeedleConfig, run_needle
from internlm_jax.evaluate.openai_client import OpenAIModel
from internlm_jax.evaluate.runner import EvalConfig, ModelSpec, evaluate_task, load_eval_config, run_eval
from internlm_jax.evaluate.scoring import score_task
from internlm_jax.evaluate.tasks import (
    BUILTIN_TASKS,
    DataConfig,
    FewShotConfig,
    GenConfig,
    Task,
    TaskConfig,
    load_task,
)

__all__ = [
    "BUILTIN_TASKS", "DataConfig", "EngineGenerator", "EvalConfig", "EvalModel", "FewShotConfig", "GenConfig",
    "LocalModel", "ModelSpec", "NeedleConfig", "OpenAIModel", "RollingResult", "ScoreResult", "Scorer", "Task",
    "TaskConfig", "evaluate_task", "load_eval_config", "load_task", "rolling_windows", "run_eval", "run_needle",
    "score_task", "split_context_continuation",
]
