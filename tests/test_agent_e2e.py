"""The agent end to end: against our real server, through the `internlm-jax agent` CLI, and over a local LM.

What is FORCED and what is real: a random tiny model never emits a tool call by itself, so in the server tests
the tokens the engine samples are replaced by a script (`serve.testing.script_engine`): the first completion is
forced to be a calculator call, the one after the tool result is forced to be the answer. Everything else is
real: the OpenAI `tools` field, the server's template rendering and tool-call parsing, HTTP, the agent loop,
the calculator run, the tool message going back, and the prompt the engine receives for the second call (checked
to hold the environment turn). The local-model tests use the random model's own (noise) output, unforced.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax import chat
from internlm_jax.agent import Agent, LocalBackend, OpenAIChatBackend, Toolkit, calculator_tool
from internlm_jax.agent import cli as agent_cli
from internlm_jax.api import Generation
from internlm_jax.serve.backend import ServeConfig
from internlm_jax.serve.testing import script_engine, serve_in_thread, tiny_engine

QUESTION = "What is 2 + 3?"
CALL_TEXT = ('Let me compute.<|action_start|><|plugin|>\n'
             '{"name": "calculator", "parameters": {"expression": "2 + 3"}}<|action_end|>')
ANSWER_TEXT = "The answer is 5.<|im_end|>"
ENV_TURN = "<|im_start|>environment name=<|plugin|>\n5<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def server(tok_dir):
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    tok = lm.tokenizer
    # the calculator's schema alone renders to ~420 tokens with this small vocabulary: room for 512
    engine = tiny_engine(lm, max_batch=4, max_len=512)

    def script_for(prompt_ids, request_id):  # FORCED: the model's choice of tokens
        text = tok.decode(prompt_ids)
        if "environment name=<|plugin|>" in text:
            return tok.encode(ANSWER_TEXT, add_bos=False)
        if "name=<|plugin|>" in text:
            return tok.encode(CALL_TEXT, add_bos=False)
        return None

    received = script_engine(engine, script_for)
    with serve_in_thread(engine, tok, ServeConfig(model_name="tiny")) as (url, _):
        yield {"url": url, "tok": tok, "received": received}
    engine.shutdown()


def test_agent_round_trips_a_tool_call_through_our_server(server):
    """The first completion is FORCED to be a calculator call and the second FORCED to be the answer; the
    server, the OpenAI tools field, the agent loop, the tool run and the tool message are real."""
    tok, received = server["tok"], server["received"]
    start = len(received)
    agent = Agent(OpenAIChatBackend(server["url"] + "/v1", "tiny", temperature=0.0), Toolkit([calculator_tool]))
    run = agent.chat(QUESTION)

    assert [(e.type, e.name) for e in run.events] == [("thought", None), ("tool_call", "calculator"),
                                                      ("tool_result", "calculator"), ("answer", None)]
    assert run.events[0].content == "Let me compute."
    assert run.events[1].arguments == {"expression": "2 + 3"}
    assert run.events[2].result.ok and run.events[2].content == "5"
    assert run.answer == "The answer is 5." and run.error is None
    assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "assistant"]
    call = run.messages[1]["tool_calls"][0]
    assert run.messages[2]["tool_call_id"] == call["id"] and run.messages[2]["content"] == "5"

    # exactly two requests reached the engine: the tools went through the `tools` field into the system
    # turn, and the second prompt carries the tool result as the environment turn after the call
    assert len(received) - start == 2
    first, second = (tok.decode(ids) for ids in received[start:])
    assert first.startswith("<s><|im_start|>system name=<|plugin|>\n[{\"name\": \"calculator\"")
    assert first.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert second == first + CALL_TEXT + "<|im_end|>\n" + ENV_TURN


def test_cli_with_piped_stdin_against_the_server(server):
    """`internlm-jax agent --url ...` in a subprocess with stdin piped: one turn (tool call FORCED as above),
    then EOF; exit code 0 and every step printed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "internlm_jax.cli", "agent", "--url", server["url"] + "/v1",
                           "--tools", "calculator", "--max-turns", "3"],
                          input=QUESTION + "\n", capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tools: calculator" in out
    assert 'thought> Let me compute.' in out
    assert '[tool call] calculator({"expression": "2 + 3"})' in out
    assert "[tool result] 5" in out
    assert "assistant> The answer is 5." in out
    assert out.index("[tool call]") < out.index("[tool result]") < out.index("assistant>")


def test_cli_rejects_bad_arguments(capsys):
    assert agent_cli.main(["--url", "http://127.0.0.1:1/v1", "--tools", "python,shell"]) == 2
    assert "unknown tool(s) shell" in capsys.readouterr().err
    assert agent_cli.main(["--tools", "calculator"]) == 2
    assert "give --model" in capsys.readouterr().err
    assert agent_cli.main(["--model", "no-such-model", "--tools", ""]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at 'no-such-model'" in err and "internlm2-tiny" in err


class _ForcedLM:
    """Stands in for an LM whose generate stopped on <|action_end|>: checks what LocalBackend passes in and
    what it makes of a stop token that generate drops."""

    def __init__(self, tokenizer, config, reply: str):
        self.tokenizer, self.config, self.reply, self.seen = tokenizer, config, reply, []

    def generate(self, prompts, max_new_tokens, **kw):
        self.seen.append((prompts, max_new_tokens, kw))
        ids = self.tokenizer.encode(self.reply, add_bos=False)
        return [Generation(self.tokenizer.decode(ids), ids, "stop", len(prompts[0]), self.tokenizer.action_end_id)]


def test_local_backend_prompt_and_action_end(tok_dir):
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    fake = _ForcedLM(lm.tokenizer, lm.config, CALL_TEXT[: -len(chat.ACTION_END)])
    tools = Toolkit([calculator_tool]).to_openai()
    messages = [{"role": "user", "content": QUESTION}]
    text = LocalBackend(fake, max_new_tokens=40).complete(messages, tools)
    assert text == CALL_TEXT  # special tokens kept, the dropped <|action_end|> put back
    (prompts, max_new, kw), = fake.seen
    assert prompts == [lm.tokenizer.encode(chat.render(messages, tools=tools), add_bos=False)]
    assert prompts[0][0] == lm.tokenizer.bos_id and prompts[0][1] != lm.tokenizer.bos_id  # one <s>
    assert max_new == 40 and kw["return_details"]
    assert set(kw["stop_token_ids"]) == {lm.tokenizer.eos_id, lm.tokenizer.im_end_id, lm.tokenizer.action_end_id}


def test_local_backend_runs_the_loop_on_a_random_model(tok_dir):
    """No forcing: the random model's own output goes through lm.generate and the parser; the run must end
    within max_turns with an answer or an error event."""
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=tok_dir)
    agent = Agent(LocalBackend(lm, max_new_tokens=24), Toolkit([calculator_tool]), max_turns=2)
    run = agent.chat(QUESTION)
    assert run.events and run.events[-1].type in ("answer", "error")
    assert max(e.turn for e in run.events) <= 2
    assert (run.answer is None) != (run.error is None)
    assert run.messages[0] == {"role": "user", "content": QUESTION}


def test_cli_local_preset_one_turn(tok_dir):
    """`internlm-jax agent --model internlm2-tiny --tokenizer DIR` (random weights, in process) answers one
    piped line, then /exit."""
    out = io.StringIO()
    rc = agent_cli.main(["--model", "internlm2-tiny", "--tokenizer", str(tok_dir), "--tools", "calculator",
                         "--max-tokens", "16", "--max-turns", "2"], stdin=io.StringIO("hello\n/exit\n"), stdout=out)
    text = out.getvalue()
    assert rc == 0
    assert "RANDOM weights" in text and "tools: calculator" in text
    assert "assistant>" in text or "[error]" in text
