"""Runs: cached predictions with resume after an interruption, results and summary files, needle test, CLI."""

import json
import os
import subprocess
import sys

import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.evaluate import EvalConfig, LocalModel, ModelSpec, NeedleConfig, run_eval
from internlm_jax.evaluate.cli import main as eval_main
from internlm_jax.evaluate.needle import build_context, run_needle
from internlm_jax.evaluate.summary import summary_rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def lm(tok_dir):
    return ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)


class Flaky(LocalModel):
    """Counts the items it scores; raises on the call after `fail_after` calls (an interrupted run)."""

    def __init__(self, lm, fail_after=None):
        super().__init__(lm, name="tiny", batch_size=8)
        self.calls = self.pairs = 0
        self.fail_after = fail_after

    def loglikelihood(self, pairs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("injected failure")
        self.pairs += len(pairs)
        return super().loglikelihood(pairs)


def _config(work_dir, tasks=("mmlu_sample", "ceval_sample"), **kw):
    return EvalConfig(work_dir=str(work_dir), models=(ModelSpec(name="tiny", preset="internlm2-tiny"),),
                      tasks=tasks, save_every=2, **kw)


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_resume_after_interruption_computes_only_the_rest(lm, tmp_path):
    cfg = _config(tmp_path / "run")
    first = Flaky(lm, fail_after=3)  # mmlu_sample: 8 items in chunks of 2; the 4th chunk raises
    with pytest.raises(RuntimeError, match="injected"):
        run_eval(cfg, models={"tiny": first}, progress=False)
    cache = tmp_path / "run" / "predictions" / "tiny" / "mmlu_sample.jsonl"
    assert len(cache.read_text().splitlines()) == 6
    second = Flaky(lm)
    res = run_eval(cfg, models={"tiny": second}, progress=False)
    assert res["tasks"]["mmlu_sample"]["computed"]["tiny"] == 2  # only the 2 remaining items
    assert res["tasks"]["ceval_sample"]["computed"]["tiny"] == 6
    assert second.pairs == 4 * 2 + 4 * 6  # four choices per item
    # same numbers as one uninterrupted run
    fresh = run_eval(_config(tmp_path / "fresh"), models={"tiny": Flaky(lm)}, progress=False)
    for t in ("mmlu_sample", "ceval_sample"):
        assert res["tasks"][t]["metrics"] == fresh["tasks"][t]["metrics"]
    # a third run computes nothing and never needs the model
    res3 = run_eval(cfg, models={"tiny": Flaky(lm, fail_after=0)}, progress=False)
    assert res3["tasks"]["mmlu_sample"]["computed"]["tiny"] == 0
    assert res3["tasks"]["mmlu_sample"]["metrics"] == res["tasks"]["mmlu_sample"]["metrics"]
    # a torn last line (killed mid-write) is dropped and that item recomputed
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    res4 = run_eval(cfg, models={"tiny": Flaky(lm)}, progress=False)
    assert res4["tasks"]["mmlu_sample"]["computed"]["tiny"] == 1
    assert res4["tasks"]["mmlu_sample"]["metrics"] == res["tasks"]["mmlu_sample"]["metrics"]
    # changing the prompt changes the task version: the old cache is set aside, everything recomputed
    from dataclasses import replace

    from internlm_jax.evaluate import BUILTIN_TASKS

    changed = replace(BUILTIN_TASKS["mmlu_sample"], prompt="{question}\n{options}\nAnswer:")
    res5 = run_eval(_config(tmp_path / "run", tasks=(changed,)), models={"tiny": Flaky(lm)}, progress=False)
    assert res5["tasks"]["mmlu_sample"]["computed"]["tiny"] == 8
    assert (cache.parent / "mmlu_sample.jsonl.stale").exists()
    # outputs
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["mmlu_sample"]["version"] == res5["tasks"]["mmlu_sample"]["version"]
    for name in ("summary.md", "summary.csv", "summary.txt", "summary.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "summary.csv").read_text().splitlines()[0] == "dataset,version,metric,mode,tiny"


def test_summary_table_marks_missing_with_dash():
    results = {"models": ["a", "b"], "needle": {"b": {"version": "abc123", "average": 50.0}},
               "tasks": {"gsm8k": {"version": "111111", "mode": "gen", "metrics": {"a": {"accuracy": 12.5}}},
                         "mmlu": {"version": "222222", "mode": "ppl",
                                  "metrics": {"a": {"accuracy": 50.0}, "b": {"accuracy": 25.0}}}}}
    header, rows = summary_rows(results)
    assert header == ["dataset", "version", "metric", "mode", "a", "b"]
    assert rows == [["gsm8k", "111111", "accuracy", "gen", "12.50", "-"],
                    ["mmlu", "222222", "accuracy", "ppl", "50.00", "25.00"],
                    ["needle_in_a_haystack", "abc123", "score", "gen", "-", "50.00"]]


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_needle_context_and_outputs(lm, tmp_path):
    hay, needle = list(range(100, 130)), [7, 8, 9]
    for depth in (0, 10, 50, 100):
        ctx = build_context(hay, needle, 64, depth)
        at = int(61 * depth / 100)  # 64 - 3 haystack tokens, needle at int(len * depth / 100)
        assert len(ctx) == 64 and ctx[at: at + 3] == needle
        assert [t for t in ctx if t not in needle] == (hay * 3)[:61]
    cfg = NeedleConfig(lengths=(64, 128), depths=(0.0, 50.0, 100.0), max_new_tokens=4)
    res = run_eval(EvalConfig(work_dir=str(tmp_path), models=(ModelSpec(name="tiny", preset="internlm2-tiny"),),
                              needle=cfg), models={"tiny": LocalModel(lm, name="tiny")}, progress=False)
    out = tmp_path / "needle" / "tiny"
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| depth % | 64 | 128 |"
    assert [r.split("|")[1].strip() for r in table[2:]] == ["0", "50", "100", "average"]
    probes = [json.loads(x) for x in (out / "probes.jsonl").read_text().splitlines()]
    assert len(probes) == 6 and all(p["score"] in (0.0, 100.0) for p in probes)
    assert res["needle"]["tiny"]["average"] == sum(p["score"] for p in probes) / 6
    # the table's orientation and scoring, with a stand-in that finds the needle only in a prompt's first half
    class FirstHalf(LocalModel):
        def generate(self, prompts, **kw):
            return ["pear juice." if p.find("pear juice") < len(p) / 2 else "I do not know." for p in prompts]

    res = run_needle(FirstHalf(lm, name="half"), NeedleConfig(lengths=(64, 256), depths=(0.0, 100.0)),
                     str(tmp_path / "half"))
    assert res["scores"] == {"64": {"0.0": 100.0, "100.0": 100.0}, "256": {"0.0": 100.0, "100.0": 0.0}}
    assert (tmp_path / "half" / "table.csv").read_text().splitlines() == [
        "depth %,64,256", "0,100,100", "100,100,0", "average,100.0,50.0"]
    with pytest.raises(ij.ConfigError, match="max_length"):
        run_eval(EvalConfig(work_dir=str(tmp_path / "long"), models=(ModelSpec(name="tiny", preset="x"),),
                            needle=NeedleConfig(lengths=(600,))), models={"tiny": LocalModel(lm, name="tiny")},
                 progress=False)


def test_cli_tasks_and_config_errors(tmp_path, capsys):
    assert eval_main(["tasks"]) == 0
    assert "gsm8k_sample" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("work_dir: x\nmodels:\n  - name: m\n    preset: internlm2-tiny\n    batchsize: 4\ntasks: [mmlu_sample]\n")
    assert eval_main([str(bad)]) == 2
    assert "batch_size" in capsys.readouterr().err  # the unknown key and the nearest valid one
    bad.write_text("work_dir: x\nmodels:\n  - name: m\n    preset: internlm2-tiny\ntasks: [no_such_task]\n")
    assert eval_main([str(bad), f"work_dir={tmp_path / 'w'}"]) == 2
    assert "neither a built-in task" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_subprocess_resumes(tok_dir, tmp_path):
    """A real `internlm-jax eval` process killed halfway; the rerun computes only the remaining items."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\nsave_every: 1\nbar_chart: false\nmodels:\n  - name: tiny\n"
                   f"    preset: internlm2-tiny\n    tokenizer: {tok_dir}\n    batch_size: 4\n"
                   "tasks: [hellaswag_sample]\n")
    cmd = [sys.executable, "-m", "internlm_jax.evaluate.cli", str(cfg), "--no-progress"]
    cache = tmp_path / "w" / "predictions" / "tiny" / "hellaswag_sample.jsonl"
    # SIGKILL after 3 of the 6 items are cached (deterministic fault injection, not a timer race).
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "INTERNLM_JAX_EVAL_FAULT": "kill_after_items:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = len([x for x in cache.read_text().splitlines() if x.endswith("}")])
    assert done == 3, "the process should have been killed halfway through the 6 items"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["tasks"]["hellaswag_sample"]["computed"]["tiny"] == 6 - done
    assert os.path.exists(tmp_path / "w" / "summary.md")


def test_yaml_config_env_and_task_files(tmp_path, monkeypatch):
    from internlm_jax.evaluate import load_eval_config, load_task
    from internlm_jax.evaluate.data import ASSETS

    monkeypatch.setenv("MMLU_DIR", os.path.join(ASSETS, "mmlu"))
    task_yaml = tmp_path / "task.yaml"
    task_yaml.write_text("name: physics_chat\nformat: mmlu\ndata:\n  path: ${MMLU_DIR}/high_school_physics_test.csv\n"
                         "fewshot:\n  k: 2\n  path: ${MMLU_DIR}/high_school_physics_dev.csv\nchat: true\n")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"work_dir: {tmp_path / 'w'}\nmodels:\n  - name: m\n    path: ${{MODEL_DIR}}\n"
                        f"    quant: int4\n    mesh: {{data: -1}}\ntasks:\n  - mmlu_sample\n  - {task_yaml}\n")
    monkeypatch.setenv("MODEL_DIR", "/models/internlm2-chat-7b")
    cfg = load_eval_config(str(run_yaml), ["models=[{name: m2, path: /x, batch_size: 2}]"])
    assert cfg.models[0].name == "m2" and cfg.models[0].batch_size == 2
    cfg = load_eval_config(str(run_yaml))
    assert cfg.models[0].path == "/models/internlm2-chat-7b" and cfg.models[0].mesh.data == -1
    task = load_task(cfg.tasks[1])
    assert task.name == "physics_chat" and len(task) == 8 and task.prompt(0)[0]["role"] == "user"
    with pytest.raises(ij.ConfigError, match="exactly one of path"):
        load_eval_config(None, [f"work_dir={tmp_path}", "models=[{name: m}]", "tasks=[mmlu_sample]"])


def test_int4_model_spec(tok_dir):
    from internlm_jax.evaluate.runner import build_model

    pairs = [("The quick brown fox", " jumps over"), ("Hello", " world")]
    dense = build_model(ModelSpec(name="d", preset="internlm2-tiny", tokenizer=tok_dir))
    q = build_model(ModelSpec(name="q", preset="internlm2-tiny", tokenizer=tok_dir, quant="int4",
                              quant_group_size=32))
    a, b = dense.loglikelihood(pairs), q.loglikelihood(pairs)
    assert type(q.lm.params["layers"]["w1"]).__name__ == "QuantizedLinear"
    for x, y in zip(a, b):
        assert x.logprob != y.logprob and abs(x.logprob - y.logprob) < 0.05 * abs(x.logprob)


@pytest.mark.slow
def test_sharded_model_scores_equal_single_device(tok_dir, tmp_path):
    """Params and batches over 8 simulated devices (data 4 x tensor 2) score like one device."""
    script = tmp_path / "s.py"
    script.write_text(
        "import json, sys\n"
        "from internlm_jax.evaluate.runner import ModelSpec, build_model\n"
        "from internlm_jax.sharding import MeshConfig\n"
        f"tok = {str(tok_dir)!r}\n"
        "pairs = [('The quick brown fox', ' jumps over'), ('Hello', ' world'), ('A', ' b')]\n"
        "one = build_model(ModelSpec(name='a', preset='internlm2-tiny', tokenizer=tok))\n"
        "many = build_model(ModelSpec(name='b', preset='internlm2-tiny', tokenizer=tok,\n"
        "                             mesh=MeshConfig(data=4, tensor=2)))\n"
        "assert len(many.lm.params['layers']['w1'].sharding.device_set) == 8\n"
        "print(json.dumps([[r.logprob for r in m.loglikelihood(pairs)] for m in (one, many)]))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    one, many = json.loads(out.stdout.strip().splitlines()[-1])
    assert many == pytest.approx(one, rel=1e-6, abs=1e-5)


@pytest.mark.slow
def test_engine_generator_matches_lm_generate(tok_dir, lm, tmp_path):
    """generator: engine (continuous batching, paged KV) gives the same greedy GSM8K answers as LM.generate."""
    import dataclasses

    from internlm_jax.evaluate import BUILTIN_TASKS, FewShotConfig, GenConfig
    from internlm_jax.evaluate.runner import build_model

    engine = {"page_size": 16, "num_pages": 160, "max_num_seqs": 8, "max_model_len": 256,
              "max_num_batched_tokens": 72, "chunk_size": 64, "max_prefill_rows": 2, "decode_batch_buckets": [8],
              "prefill_batch_buckets": [2], "chunk_buckets": [64], "width_buckets": [16]}
    spec = ModelSpec(name="eng", preset="internlm2-tiny", tokenizer=tok_dir, generator="engine", engine=engine)
    task = dataclasses.replace(BUILTIN_TASKS["gsm8k_sample"], fewshot=FewShotConfig(k=0),
                               gen=GenConfig(max_new_tokens=8))
    cfg = EvalConfig(work_dir=str(tmp_path), models=(spec, ModelSpec(name="lm", preset="internlm2-tiny")),
                     tasks=(task,))
    run_eval(cfg, models={"eng": build_model(spec), "lm": LocalModel(lm, name="lm")}, progress=False)
    raw = {m: [json.loads(x)["raw"] for x in (tmp_path / "predictions" / m / "gsm8k_sample.jsonl")
               .read_text().splitlines()] for m in ("eng", "lm")}
    assert len(raw["lm"]) == 8 and raw["eng"] == raw["lm"]


def test_cli_exit_code_says_a_task_failed_after_scoring_the_others(tmp_path, monkeypatch, capsys, tok_dir):
    """One task that cannot run on the model is recorded as an error, the others are scored and written, and
    the command's exit code is 1 so scripts notice."""
    from internlm_jax.evaluate import runner

    real = runner.score_task

    def score_task(task, records):
        if task.name == "ceval_sample":
            raise ValueError("this task cannot run on this model")
        return real(task, records)

    monkeypatch.setattr(runner, "score_task", score_task)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\nmodels:\n  - name: m\n    preset: internlm2-tiny\n"
                   f"    tokenizer: {tok_dir}\ntasks: [mmlu_sample, ceval_sample]\n")
    assert eval_main([str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "1 task(s) failed: ceval_sample (m)" in err
    import json

    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["tasks"]["mmlu_sample"]["metrics"] and "m" in results["tasks"]["ceval_sample"]["errors"]
