"""A task = local data + prompt template (zero/few-shot, raw or chat) + inferencer + metrics.

`TaskConfig` is what a YAML run config holds; `Task` is the loaded, ready form: normalised samples and
prompt builders. Built-in sample tasks (`BUILTIN_TASKS`) run on the tiny files in internlm_jax/assets/eval.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import string
from typing import Any, Literal

from internlm_jax.config import ConfigError
from internlm_jax.evaluate import data as data_lib
from internlm_jax.evaluate.formats import FORMATS, LETTERS, FormatSpec, get_format, wikitext_detokenize
from internlm_jax.evaluate.models import Prompt

Inferencer = Literal["ppl", "ll", "clp", "gen", "rolling"]
FileFormat = Literal["auto", "jsonl", "json", "csv", "parquet"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str  # a local file, or assets:NAME for a shipped sample
    format: FileFormat = "auto"
    columns: tuple[str, ...] | None = None  # names for a header-less CSV
    limit: int | None = None


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    k: int = 0
    path: str | None = None  # a dev split; without it the shots are the first k other items of the data
    format: FileFormat = "auto"
    columns: tuple[str, ...] | None = None
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")


@dataclasses.dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int | None = None  # None: the format's default
    stop: tuple[str, ...] | None = None  # None: the format's default
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1  # completions per prompt (pass@k needs num_samples >= k)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError("num_samples > 1 with temperature 0 repeats one greedy answer; set a temperature")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str
    format: str
    data: DataConfig
    inferencer: Inferencer | None = None  # None: the format's default
    prompt: str | None = None  # str.format template over the sample's fields
    continuation: str | None = None  # per-choice text scored after the prompt (ppl / ll / clp)
    fewshot_answer: str | None = None  # appended to a shot's prompt
    fewshot: FewShotConfig = FewShotConfig()
    chat: bool = False  # wrap in the chat template (few-shot shots become earlier turns)
    system: str | None = None  # chat system message
    gen: GenConfig = GenConfig()
    postprocess: str | None = None
    metrics: tuple[str, ...] | None = None
    fields: dict[str, str] = dataclasses.field(default_factory=dict)  # record keys for question/answer/...
    normalize: Literal["char", "byte", "token"] = "char"  # ll: the length that accuracy_norm divides by
    pass_k: tuple[int, ...] = (1,)
    exec_backend: Literal["auto", "sandbox", "subprocess"] = "auto"
    exec_timeout: float = 10.0
    exec_memory_mb: int = 1024
    window: int | None = None  # rolling: tokens per model input (None: the model's max_length)
    stride: int | None = None  # rolling: new tokens per window (None: = window)
    detokenize: bool = True  # wikitext: undo the " @-@ " style tokenisation before scoring

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is unknown; choose one of {', '.join(FORMATS)}")
        spec = FORMATS[self.format]
        inf = self.inferencer or spec.inferencer
        allowed = {"mc": ("ppl", "ll", "clp", "gen"), "gen": ("gen",), "code": ("gen",), "text": ("rolling",)}
        if inf not in allowed[spec.kind]:
            raise ConfigError(f"task {self.name!r}: inferencer {inf!r} does not fit format {self.format!r}; use "
                              f"one of {', '.join(allowed[spec.kind])}")
        if self.chat and spec.kind in ("code", "text"):
            raise ConfigError(f"task {self.name!r}: chat: true is not supported for {self.format!r} (code completion"
                              " and perplexity read raw text); set chat: false")
        if self.system is not None and not self.chat:
            raise ConfigError(f"task {self.name!r}: a system message needs chat: true")


_SAMPLE = "assets:"
BUILTIN_TASKS: dict[str, TaskConfig] = {
    "mmlu_sample": TaskConfig("mmlu_sample", "mmlu", DataConfig(_SAMPLE + "mmlu/high_school_physics_test.csv"),
                              fewshot=FewShotConfig(k=2, path=_SAMPLE + "mmlu/high_school_physics_dev.csv")),
    "mmlu_sample_clp": TaskConfig("mmlu_sample_clp", "mmlu",
                                  DataConfig(_SAMPLE + "mmlu/high_school_physics_test.csv"), inferencer="clp"),
    "mmlu_sample_gen": TaskConfig("mmlu_sample_gen", "mmlu",
                                  DataConfig(_SAMPLE + "mmlu/high_school_physics_test.csv"), inferencer="gen"),
    "ceval_sample": TaskConfig("ceval_sample", "ceval", DataConfig(_SAMPLE + "ceval/computer_network_val.csv")),
    "cmmlu_sample": TaskConfig("cmmlu_sample", "cmmlu", DataConfig(_SAMPLE + "cmmlu/chinese_history_test.csv")),
    "hellaswag_sample": TaskConfig("hellaswag_sample", "hellaswag", DataConfig(_SAMPLE + "hellaswag_sample.jsonl")),
    "gsm8k_sample": TaskConfig("gsm8k_sample", "gsm8k", DataConfig(_SAMPLE + "gsm8k_sample.jsonl"),
                               fewshot=FewShotConfig(k=2), gen=GenConfig(max_new_tokens=128)),
    "math_sample": TaskConfig("math_sample", "math", DataConfig(_SAMPLE + "math_sample.jsonl"),
                              gen=GenConfig(max_new_tokens=128)),
    "humaneval_sample": TaskConfig("humaneval_sample", "humaneval", DataConfig(_SAMPLE + "humaneval_sample.jsonl"),
                                   gen=GenConfig(max_new_tokens=128)),
    "wikitext_sample": TaskConfig("wikitext_sample", "wikitext", DataConfig(_SAMPLE + "wikitext_sample.parquet")),
}


class _Fields(dict):
    def __missing__(self, key: str) -> Any:
        raise ConfigError(f"prompt template field {{{key}}} is not in the sample; available: "
                          f"{', '.join(sorted(self))}")


def fill(template: str, fields: dict[str, Any]) -> str:
    try:
        return string.Formatter().vformat(template, (), _Fields(fields))
    except (ValueError, IndexError) as e:
        raise ConfigError(f"bad prompt template {template[:60]!r}: {e} (write literal braces as {{{{ }}}})") from None


class Task:
    """A loaded task: samples, shots, prompts, choice continuations, gold answers."""

    def __init__(self, config: TaskConfig, base_dir: str | None = None):
        self.config = config
        self.name = config.name
        self.spec: FormatSpec = get_format(config.format)
        self.kind = self.spec.kind
        self.mode: str = config.inferencer or self.spec.inferencer
        path = data_lib.resolve_path(config.data.path, base_dir)
        columns = config.data.columns or (self.spec.columns if path.endswith(".csv") else None)
        records = data_lib.load_records(path, config.data.format, columns, config.data.limit)
        if not records:
            raise ConfigError(f"task {self.name!r}: {path} holds no records")
        self.samples = [self._normalize(r, path) for r in records]
        digests = [data_lib.file_digest(path)]
        self.shots_from_data = config.fewshot.path is None
        if config.fewshot.k and config.fewshot.path is not None:
            fpath = data_lib.resolve_path(config.fewshot.path, base_dir)
            fcols = config.fewshot.columns or (self.spec.columns if fpath.endswith(".csv") else None)
            self.shot_pool = [self._normalize(r, fpath) for r in data_lib.load_records(fpath, config.fewshot.format,
                                                                                     fcols)]
            digests.append(data_lib.file_digest(fpath))
        else:
            self.shot_pool = self.samples
        if config.fewshot.k > len(self.shot_pool) - (1 if self.shots_from_data else 0):
            raise ConfigError(f"task {self.name!r}: {config.fewshot.k}-shot needs more examples than the "
                              f"{len(self.shot_pool)} available")
        self.prompt_template = config.prompt if config.prompt is not None else self.spec.prompt
        self.continuation_template = (config.continuation if config.continuation is not None
                                      else self.spec.continuation)
        self.fewshot_template = (config.fewshot_answer if config.fewshot_answer is not None
                                 else self.spec.fewshot_answer)
        self.postprocess = config.postprocess or self.spec.postprocess
        if self.kind == "mc" and self.mode == "gen" and config.postprocess is None:
            self.postprocess = "first_option"
        self.metrics = config.metrics or self._default_metrics()
        self.stop = tuple(config.gen.stop if config.gen.stop is not None else self.spec.stop)
        self.max_new_tokens = config.gen.max_new_tokens or self.spec.max_new_tokens
        if self.kind == "code" and max(config.pass_k) > config.gen.num_samples:
            raise ConfigError(f"task {self.name!r}: pass@{max(config.pass_k)} needs gen.num_samples >= "
                              f"{max(config.pass_k)}")
        self.version = self._version(digests)

    def __len__(self) -> int:
        return len(self.samples)

    def _normalize(self, rec: dict[str, Any], path: str) -> dict[str, Any]:
        s = self.spec.normalize(rec, dict(self.config.fields), path)
        if self.kind == "text" and self.config.format == "wikitext" and self.config.detokenize:
            s["text"] = wikitext_detokenize(s["text"])
        return s

    def _default_metrics(self) -> tuple[str, ...]:
        if self.kind == "code":
            return tuple(f"pass@{k}" for k in self.config.pass_k)
        if self.kind == "mc":
            return ("accuracy", "accuracy_norm") if self.mode == "ll" else ("accuracy",)
        return self.spec.metrics

    def _version(self, digests: list[str]) -> str:
        """Short hash of everything that decides the predictions (like OpenCompass's prompt hash)."""
        from internlm_jax.runconfig import to_dict

        cfg = to_dict(self.config)
        for key in ("name", "metrics", "pass_k", "exec_backend", "exec_timeout", "exec_memory_mb"):
            cfg.pop(key, None)  # settings of scoring, not of the predictions
        blob = json.dumps({"config": cfg, "data": digests}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:6]

    # ---- prompts ----------------------------------------------------------------------------------------
    def fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        f = dict(sample)
        if self.kind == "mc":
            ch = sample["choices"]
            for i, c in enumerate(ch):
                f[LETTERS[i]] = c
            f["options"] = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ch))
            f["gold_label"] = LETTERS[sample["answer"]]
            f["gold_choice"] = ch[sample["answer"]]
        return f

    def shots(self, idx: int) -> list[dict[str, Any]]:
        k = self.config.fewshot.k
        if not k:
            return []
        if self.shots_from_data:
            return [s for j, s in enumerate(self.samples) if j != idx][:k]
        return self.shot_pool[:k]

    def prompt(self, idx: int) -> Prompt:
        sample = self.samples[idx]
        if self.kind == "code":
            return fill(self.prompt_template, sample)  # completion models continue the function body
        shots = self.shots(idx)
        if self.config.chat:
            msgs: list[dict[str, Any]] = []
            if self.config.system:
                msgs.append({"role": "system", "content": self.config.system})
            for s in shots:
                f = self.fields(s)
                msgs.append({"role": "user", "content": fill(self.prompt_template, f).strip()})
                msgs.append({"role": "assistant", "content": fill(self.fewshot_template, f).strip()})
            msgs.append({"role": "user", "content": fill(self.prompt_template, self.fields(sample)).strip()})
            return msgs
        sep = self.config.fewshot.separator
        parts = [fill(self.prompt_template, self.fields(s)) + fill(self.fewshot_template, self.fields(s)) + sep
                 for s in shots]
        return "".join(parts) + fill(self.prompt_template, self.fields(sample))

    def continuations(self, idx: int) -> list[str]:
        """The text scored for each choice. In chat mode the answer starts the assistant turn, so its
        leading whitespace is dropped."""
        f = self.fields(self.samples[idx])
        out = []
        for i, c in enumerate(self.samples[idx]["choices"]):
            text = fill(self.continuation_template, {**f, "label": LETTERS[i], "choice": c})
            out.append(text.lstrip() if self.config.chat else text)
        return out

    def gold(self, idx: int) -> Any:
        s = self.samples[idx]
        if self.kind == "mc":
            return LETTERS[s["answer"]] if self.mode == "gen" else s["answer"]
        if self.kind == "gen":
            return s["reference"]
        if self.kind == "code":
            return s["task_id"]
        return None


def _expand_env(x: Any) -> Any:
    if isinstance(x, str):
        return os.path.expandvars(x)
    if isinstance(x, dict):
        return {k: _expand_env(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_expand_env(v) for v in x]
    return x


def load_task(spec: TaskConfig | str, base_dir: str | None = None) -> Task:
    """A TaskConfig, the name of a built-in task, or a path to a task YAML file."""
    if isinstance(spec, str):
        if spec in BUILTIN_TASKS:
            return Task(BUILTIN_TASKS[spec], base_dir)
        path = data_lib.resolve_path(spec, base_dir)
        if path.endswith((".yaml", ".yml")) and os.path.exists(path):
            from internlm_jax.runconfig import from_dict, read_yaml

            data = {k: _expand_env(v) for k, v in read_yaml(path).items()}
            return Task(from_dict(TaskConfig, data), os.path.dirname(os.path.abspath(path)))
        raise ConfigError(f"task {spec!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor a task "
                          "YAML file")
    return Task(spec, base_dir)
