"""A new user's first hour: the demo never wipes a folder it did not write, the CLI keeps libtpu quiet on a
machine without a TPU, inputs are checked before expensive work, one eval task's failure does not stop the
others, and zero scores still show in the summary chart."""

from __future__ import annotations

import pytest

from internlm_jax import cli
from internlm_jax.config import ConfigError


def test_demo_out_refuses_a_folder_it_did_not_write(tmp_path):
    from internlm_jax import demo

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    assert demo.main(["--out", str(mine), "--quick"]) == 2  # before any work
    assert (mine / "thesis.txt").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]

    out = tmp_path / "demo"
    demo.prepare_out(out)  # new folder: created and marked
    (out / "sft").mkdir()
    (out / "sft" / "old.bin").write_text("x")
    (out / "eval.md").write_text("old")
    (out / "keep.txt").write_text("user file beside the artifacts")
    demo.prepare_out(out)  # a rerun clears exactly the demo's artifacts
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER, "keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        demo.prepare_out(tmp_path / "file")


def test_quiet_platforms_pins_cpu_only_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(cli, "_accelerator_present", lambda: False)
    env: dict[str, str] = {}
    assert cli.quiet_platforms(env) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
    for chosen in ({"JAX_PLATFORMS": ""}, {"JAX_PLATFORMS": "tpu"}, {"JAX_FORCE_TPU_INIT": "1"}):
        env = dict(chosen)
        assert cli.quiet_platforms(env) is None and env == chosen  # the user's choice stands
    monkeypatch.setattr(cli, "_accelerator_present", lambda: True)
    env = {}
    assert cli.quiet_platforms(env) is None and env == {}  # TPU/GPU hosts: JAX_PLATFORMS stays unset


def test_quantize_checks_calibration_file_before_loading(tmp_path, monkeypatch, capsys):
    from internlm_jax.quant import cli as qcli

    def no_load(args):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(qcli, "_load_model", no_load)
    base = ["--model", "internlm2-tiny", "--out", str(tmp_path / "q"), "--method", "awq"]
    assert qcli.main([*base, "--calib", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    assert qcli.main([*base, "--calib", str(tmp_path / "bad.jsonl")]) == 2
    assert "expected lines like" in capsys.readouterr().err
    (tmp_path / "ok.jsonl").write_text('{"text": "x"}\n')
    assert qcli.main(["--model", "internlm2-tinyy", "--out", str(tmp_path / "q"), "--method", "awq", "--calib",
                      str(tmp_path / "ok.jsonl")]) == 2
    assert "did you mean 'internlm2-tiny'" in capsys.readouterr().err


def test_unset_model_dir_is_a_clear_error(monkeypatch):
    from internlm_jax.evaluate.runner import load_eval_config

    monkeypatch.delenv("MODEL_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"\$MODEL_DIR is not set.*MODEL_DIR=runs/demo/sft/hf"):
        load_eval_config("configs/eval/sample.yaml")


def test_summary_marks_errors_and_labels_zero_bars(tmp_path, monkeypatch):
    import matplotlib.axes

    from internlm_jax.evaluate.summary import summary_rows, write_summary

    results = {"models": ["a"], "needle": {"a": {"version": "v1", "average": 0.0}},
               "tasks": {"t1": {"version": "1", "mode": "ppl", "metrics": {"a": {"accuracy": 0.0}}},
                         "t2": {"version": "2", "mode": "clp", "metrics": {}, "errors": {"a": "ValueError: x"}}}}
    _, rows = summary_rows(results)
    assert ["t2", "2", "-", "clp", "error"] in rows
    labels: list[str] = []
    real = matplotlib.axes.Axes.bar_label

    def spy(self, container, *args, **kw):
        labels.extend(kw.get("labels") or [])
        return real(self, container, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label", spy)
    paths = write_summary(results, str(tmp_path))
    assert "bar_chart" in paths and labels.count("0.00") == 2  # t1 and the needle: zero, but labelled
