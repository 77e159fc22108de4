"""`internlm-jax chat` (against a server and in-process; tool calls shown and answered), `internlm-jax serve`
as a real process, and `bench serve` end to end. Random tiny model; 127.0.0.1 only."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.config import ConfigError
from internlm_jax.serve import chat_cli
from internlm_jax.serve import cli as serve_cli
from internlm_jax.serve.backend import ServeConfig
from internlm_jax.serve.testing import script_engine, serve_in_thread, tiny_engine

SMALL_ENGINE = ["--max-context", "128", "--page-size", "16", "--num-pages", "40", "--max-batch", "4",
                "--engine-buckets", "decode=4;prefill=2;chunks=32;widths=8"]
WEATHER = {"type": "function", "function": {"name": "get_current_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"location": {"type": "string"}}}}}


@pytest.fixture(autouse=True)
def _no_default_compilation_cache(monkeypatch):
    """serve/chat use a persistent compilation cache under ~/.cache by default; tests keep out of it."""
    monkeypatch.setenv("INTERNLM_JAX_CACHE", "off")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def server(tok_dir):
    """A tiny server whose replies to tool prompts are forced to a call, then to an answer (see
    test_serve_tools.py for why); other prompts get the random model's own greedy tokens."""
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    tok = lm.tokenizer
    engine = tiny_engine(lm, max_batch=4, max_len=256)

    def script_for(prompt_ids, request_id):
        text = tok.decode(prompt_ids)
        if "environment name=<|plugin|>" in text:
            return tok.encode("Sunny, 25 degrees.<|im_end|>", add_bos=False)
        if "name=<|plugin|>" in text:
            return tok.encode('Checking.<|action_start|><|plugin|>\n{"name": "get_current_weather", '
                              '"parameters": {"location": "Paris"}}<|action_end|>', add_bos=False)
        return None

    script_engine(engine, script_for)
    with serve_in_thread(engine, tok, ServeConfig(model_name="tiny")) as (url, _):
        yield url
    engine.shutdown()


def _run_chat(monkeypatch, capsys, argv: list[str], lines: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert chat_cli.main(argv) == 0
    return capsys.readouterr().out


def _replies(out: str) -> list[str]:
    """The printed assistant replies (a reply ends with a newline, then the next prompt)."""
    return [part.split("\n\nuser> ")[0].removesuffix("\n").removesuffix(" [cut at --max-tokens]")
            for part in out.split("assistant> ")[1:]]


def test_chat_cli_remote_history_reset_system(server, monkeypatch, capsys):
    client = openai.OpenAI(base_url=server + "/v1", api_key="x")
    ask = lambda msgs: client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                                      temperature=0).choices[0].message.content
    out = _run_chat(monkeypatch, capsys, ["--url", server, "--temperature", "0", "--max-tokens", "8"],
                    "Hello\nAgain\n/reset\n/system Be brief.\nHello\n/nope\n/exit\n")
    first = ask([{"role": "user", "content": "Hello"}])
    second = ask([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                  {"role": "user", "content": "Again"}])
    third = ask([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert _replies(out) == [chat_cli.printable(x) for x in (first, second, third)]  # shown escaped
    assert "(conversation reset)" in out and "(system prompt set; conversation reset)" in out
    assert "unknown command '/nope'" in out


def test_chat_cli_shows_tool_calls(server, tmp_path, monkeypatch, capsys):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    out = _run_chat(monkeypatch, capsys, ["--url", server, "--tools", str(tools), "--temperature", "0"],
                    "Weather in Paris?\n{\"temp\": 25}\n/exit\n")
    assert 'assistant> Checking.\n[tool call] get_current_weather({"location": "Paris"})' in out
    assert "tool result for get_current_weather> " in out
    assert "assistant> Sunny, 25 degrees." in out
    assert "<|" not in out


@pytest.mark.slow  # over ~3.5 s: kept out of the quick loop (-m 'not slow')
def test_chat_cli_in_process(tok_dir, server, monkeypatch, capsys):
    """In-process (engine stepped on the caller's thread) gives the same greedy reply as the server."""
    out = _run_chat(monkeypatch, capsys, ["--model", "internlm2-tiny", "--tokenizer", tok_dir, *SMALL_ENGINE,
                                          "--temperature", "0", "--max-tokens", "8"], "Hello\n")
    assert "RANDOM weights" in out
    want = openai.OpenAI(base_url=server + "/v1", api_key="x").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    assert _replies(out) == [chat_cli.printable(want.choices[0].message.content)]


@pytest.mark.slow
def test_chat_cli_tensor_parallel_and_int4(tok_dir, server, monkeypatch, capsys):
    """--tp 2 (2 of the 8 simulated CPU devices) gives the single-device greedy reply; --quant int4 and
    --kv-int8 load and answer (their numerics differ, so only the shape of the output is checked)."""
    base = ["--model", "internlm2-tiny", "--tokenizer", tok_dir, *SMALL_ENGINE, "--temperature", "0",
            "--max-tokens", "8"]
    want = openai.OpenAI(base_url=server + "/v1", api_key="x").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    out = _run_chat(monkeypatch, capsys, [*base, "--tp", "2"], "Hello\n")
    assert _replies(out) == [chat_cli.printable(want.choices[0].message.content)]
    out = _run_chat(monkeypatch, capsys, [*base, "--quant", "int4", "--quant-group-size", "32", "--kv-int8"],
                    "Hello\n")
    assert len(_replies(out)) == 1 and "[error]" not in out


def test_cli_errors(capsys):
    assert serve_cli.main(["--model", "no-such-model"]) == 2
    assert "no checkpoint at 'no-such-model'" in capsys.readouterr().err
    assert serve_cli.main(["--model", "internlm2-tinyy"]) == 2
    assert "did you mean the preset 'internlm2-tiny'" in capsys.readouterr().err
    assert chat_cli.main([]) == 2
    assert "give --model" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_checks_the_tokenizer_before_the_warm_up(tmp_path, monkeypatch, capsys):
    from internlm_jax.serve import loading

    ij.init("internlm2-tiny", seed=0).save(str(tmp_path / "no_tok"))  # an HF folder without tokenizer files

    def no_warmup(*a, **k):
        raise AssertionError("the engine was built (and warmed up) before the tokenizer check")

    monkeypatch.setattr(loading, "build_engine", no_warmup)
    assert chat_cli.main(["--model", str(tmp_path / "no_tok")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


class _Scripted:
    def __init__(self, *replies):
        self.replies = list(replies)

    def reply(self, messages):
        item = self.replies.pop(0)
        if isinstance(item, BaseException):
            yield ("content", "partial ")
            raise item
        yield ("content", item)
        yield ("done", "stop")


def test_chat_escapes_control_characters_and_survives_ctrl_c():
    backend = _Scripted("\x1b[2J\rgotcha\x07 ok\n\tline", KeyboardInterrupt(), "fine")
    out = io.StringIO()
    assert chat_cli.run_chat(backend, None, io.StringIO("one\ntwo\nthree\n"), out) == 0
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "\\x1b[2J\\rgotcha\\x07 ok\n\tline" in text  # shown escaped; newline and tab kept
    assert "[reply stopped; this turn was dropped]" in text and "assistant> fine" in text

    class CtrlCAtPrompt(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    assert chat_cli.run_chat(_Scripted(), None, CtrlCAtPrompt(), io.StringIO()) == 130


def test_warmup_progress_and_ready_line_without_cache(tok_dir, caplog):
    import argparse

    from internlm_jax.serve import loading

    p = argparse.ArgumentParser()
    loading.add_model_args(p)
    args = p.parse_args(["--model", "internlm2-tiny", "--tokenizer", tok_dir, "--no-compilation-cache",
                         *SMALL_ENGINE])
    lm, _ = loading.load_lm(args)
    calls = []
    engine = loading.build_engine(lm, args, progress=lambda *c: calls.append(c))
    n = calls[-1][1]
    assert n >= 3 and [c[0] for c in calls] == list(range(n + 1))  # each program announced, then done
    assert calls[0][2] is not None and calls[-1][0] == n
    assert engine.warmup_origin == "compiled (persistent cache off)"
    engine.shutdown()


def test_api_keys_from_flag_file_and_environment(tmp_path, capsys):
    keys = tmp_path / "keys.txt"
    keys.write_text("# operators\nk2\n\n  k3  # ci\nk1\n")
    env = {serve_cli.API_KEYS_ENV: "k4, k5,"}
    assert serve_cli.gather_api_keys(["k1,k0"], str(keys), env) == ("k1", "k0", "k2", "k3", "k4", "k5")
    assert serve_cli.gather_api_keys(None, None, {}) == ()
    assert serve_cli.gather_api_keys(None, None, env) == ("k4", "k5")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    for path, needle in ((empty, "holds no key"), (tmp_path / "missing.txt", "cannot be read")):
        with pytest.raises(ConfigError, match=needle):
            serve_cli.gather_api_keys(None, str(path), {})
        # the server refuses to start (exit 2) rather than serve without the keys the operator meant
        assert serve_cli.main(["--model", "internlm2-tiny", "--api-keys-file", str(path)]) == 2
        assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_end_to_end(tok_dir, tmp_path):
    port = _free_port()
    (tmp_path / "keys").write_text("k2\n")
    cmd = [sys.executable, "-m", "internlm_jax.cli", "serve", "--model", "internlm2-tiny", "--tokenizer", tok_dir,
           "--host", "127.0.0.1", "--port", str(port), "--api-keys", "k1", "--api-keys-file", str(tmp_path / "keys"),
           "--served-model-name", "tiny-served", "--log-level", "warning", *SMALL_ENGINE]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, JAX_PLATFORMS="cpu", INTERNLM_JAX_API_KEYS="k3"))
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
            client = openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0)
            assert [m.id for m in client.models.list().data] == ["tiny-served"]
            r = client.chat.completions.create(model="tiny-served", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
            assert r.usage.completion_tokens >= 1
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
            for key in ("k1", "k3"):  # the flag and the environment; k2 (the file) is used above
                assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert httpx.get(url + "/metrics").status_code == 401
            assert "RANDOM WEIGHTS" in (tmp_path / "serve.log").read_text()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                assert proc.wait(30) == 0  # Ctrl-C is a clean shutdown
            finally:
                if proc.poll() is None:
                    proc.kill()


def _start_serve(args: list[str], log_path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "internlm_jax.cli", "serve", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.3)


@pytest.mark.slow
def test_second_serve_start_loads_programs_from_the_compilation_cache(tok_dir, tmp_path):
    args = ["--model", "internlm2-tiny", "--tokenizer", tok_dir, "--compilation-cache", str(tmp_path / "cache"),
            *SMALL_ENGINE]
    logs = []
    for i in range(2):
        proc, _ = _start_serve(args, tmp_path / f"serve{i}.log")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        logs.append((tmp_path / f"serve{i}.log").read_text())
    assert "warm-up: compiling program 1/" in logs[0] and "compilation cache: 0 hits" in logs[0]
    assert "all loaded from the compilation cache" in logs[1], logs[1]
    assert "started in" in logs[1]
    assert any(f.is_file() for f in (tmp_path / "cache").rglob("*"))


@pytest.mark.slow
def test_bench_serve(tok_dir, tmp_path, capsys):
    from internlm_jax import bench_serve

    out = tmp_path / "bench.json"
    rc = bench_serve.main(["--model", "internlm2-tiny", "--tokenizer", tok_dir, *SMALL_ENGINE, "--num-prompts", "12",
                           "--input-len", "24", "--output-len", "8", "--concurrency", "6", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads(out.read_text())
    for key in ("engine", "http"):
        s = report[key]
        assert s["completed"] == 12 and s["failed"] == 0
        assert s["output_tok_s"] > 0 and s["ttft_ms"]["p50"] > 0 and s["e2e_s"]["p99"] >= s["e2e_s"]["p50"]
    assert report["http"]["total_output_tokens"] == report["engine"]["total_output_tokens"]
    assert report["http_over_engine"] > 0
    assert "HTTP / engine output tok/s" in text and "TTFT" in text and "p99" in text
    assert report["server_stats"]["compilations"] == 0


@pytest.mark.slow
def test_sigterm_drains_then_ends_open_streams_with_an_error_event(tok_dir, tmp_path):
    """SIGTERM: the open stream keeps going for --drain-timeout seconds, then ends with an error event (code
    shutting_down) as its last event; then the server exits."""
    args = ["--model", "internlm2-tiny", "--tokenizer", tok_dir, "--no-compilation-cache", "--no-warmup-scoring",
            "--drain-timeout", "1", "--max-batch", "2", "--max-context", "4096",
            "--engine-buckets", "decode=2;prefill=1;chunks=64;widths=64"]
    proc, url = _start_serve(args, tmp_path / "serve.log")
    try:
        body = {"model": "internlm2-tiny", "prompt": [1, 5, 9], "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)
        err = json.loads(events[-1])
        assert err["error"]["code"] == "shutting_down", events[-3:]
        assert 3 < len(events) < 4000  # it kept streaming while draining, and was cut before the end
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if proc.poll() is None:
            proc.kill()
