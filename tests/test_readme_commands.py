"""The README's shell blocks, as a new user would type them after the two set-up commands: every command names
a real subcommand, file and option (each `internlm-jax` line is parsed by its command's own parser), and the
cheap ones run for real with small arguments (the demo's model is stood in for by a tiny one)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = ('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/internlm-jax demo',
         'python3 -m venv .venv && .venv/bin/pip install -e ".[dev,tpu]" && .venv/bin/python -m pytest -q')
PROGRAMS = {"internlm-jax", "python", "python3", "pip", "curl", "source", "sbatch", ".venv/bin/pip",
            ".venv/bin/internlm-jax", ".venv/bin/python"}


def readme_commands() -> list[list[str]]:
    """Each command of each ```bash block: continuations joined, comments dropped, `A && B` split."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return [c for c in out if c]


def _strip_env(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while cmd and re.fullmatch(r"[A-Z_]+=.*", cmd[0]):
        k, _, v = cmd[0].partition("=")
        env[k] = v
        cmd = cmd[1:]
    return env, cmd


def test_readme_keeps_the_two_setup_commands_and_says_to_activate():
    text = README.read_text(encoding="utf-8")
    for cmd in SETUP:
        assert cmd in text
    assert ["source", ".venv/bin/activate"] in readme_commands()
    assert "Troubleshooting" in text


def test_every_readme_command_parses():
    from internlm_jax.checkpoint.cli import _parser as convert_parser
    from internlm_jax.cli import COMMANDS
    from internlm_jax.quant.cli import _parser as quant_parser
    from internlm_jax.serve.chat_cli import build_parser as chat_parser
    from internlm_jax.serve.cli import build_parser as serve_parser
    from internlm_jax.train.cli import build_parser as train_parser
    from internlm_jax.train.finetune_cli import build_parser as finetune_parser

    parsers = {"serve": serve_parser, "chat": chat_parser, "train": train_parser, "finetune": finetune_parser,
               "quantize": quant_parser, "convert": convert_parser}
    seen = set()
    for cmd in readme_commands():
        env, cmd = _strip_env(cmd)
        assert cmd[0] in PROGRAMS, cmd
        for word in cmd:  # every repository file a command names exists
            if re.match(r"(configs|tools)/", word):
                assert (ROOT / word).exists(), (word, cmd)
        if env.get("MODEL_DIR"):
            assert env["MODEL_DIR"].startswith("runs/demo/"), cmd  # what the demo leaves behind
        if cmd[0] != "internlm-jax":
            continue
        name, args = cmd[1], cmd[2:]
        assert name in COMMANDS, cmd
        seen.add(name)
        if name == "convert" and args[:1] == ["merge"]:
            continue
        if name in parsers:
            parsers[name]().parse_args(args)  # SystemExit (a wrong option) fails the test
    assert {"serve", "chat", "train", "finetune", "quantize", "convert", "eval", "plan"} <= seen


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    if cmd[0] == "internlm-jax":
        cmd = [sys.executable, "-m", "internlm_jax.cli", *cmd[1:]]
    elif cmd[0] in ("python", "python3"):
        cmd = [sys.executable, *cmd[1:]]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {}))
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stdout + r.stderr


def _readme(prefix: list[str]) -> list[list[str]]:
    found = [_strip_env(c)[1] for c in readme_commands() if _strip_env(c)[1][: len(prefix)] == prefix]
    assert found, f"no README command starts with {prefix}"
    return found


def test_cheap_readme_commands_run():
    out = _run(_readme(["internlm-jax", "eval", "tasks"])[0], ROOT)
    assert "mmlu_sample" in out
    launch = _readme(["python", "tools/tpu_pod/launch.py"])[0]
    out = _run(launch, ROOT)
    assert "gcloud" in out


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """A folder laid out like the demo's output, with a random tiny model: runs/demo/sft/hf (+ tokenizer),
    runs/demo/data/corpus.jsonl."""
    from fixtures import make_tokenizer_dir

    import internlm_jax as ij

    cwd = tmp_path_factory.mktemp("user")
    hf = cwd / "runs" / "demo" / "sft" / "hf"
    ij.init("internlm2-tiny", seed=0, tokenizer=make_tokenizer_dir(cwd / "tok")).save(str(hf))
    (cwd / "runs" / "demo" / "data").mkdir(parents=True)
    (cwd / "runs" / "demo" / "data" / "corpus.jsonl").write_text(
        "".join(f'{{"text": "The river flows {i} km to the sea, and the town of {i} people lives by it."}}\n'
                for i in range(200)))
    for sub in ("configs", "tools"):
        os.symlink(ROOT / sub, cwd / sub)
    return cwd


@pytest.mark.slow
def test_readme_convert_quantize_and_train_run_as_written(demo_like):
    converts = [c for c in _readme(["internlm-jax", "convert"]) if c[2] != "merge"]
    assert len(converts) == 3
    for cmd in converts:  # in README order: HF -> orbax, orbax -> HF, HF -> Llama
        _run(cmd + ["--quiet"], demo_like)
    for cmd in _readme(["internlm-jax", "quantize"]):
        out = _run(cmd, demo_like)
        assert "saved to" in out
    train = _readme(["internlm-jax", "train", "--config", "configs/pretrain/tiny.yaml"])[0]
    _run(train + ["steps=2", "synthetic_docs=64", "checkpoint_every=2"], demo_like)
    assert (demo_like / "runs" / "tiny" / "checkpoints").is_dir()
    assert (demo_like / "data" / "synthetic" / "corpus.jsonl").exists()  # relative to where it runs (ignored)
