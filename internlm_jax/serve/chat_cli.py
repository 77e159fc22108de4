"""`internlm-jax chat`: an interactive terminal chat, in-process with the engine or against a server.

    internlm-jax chat --model /ckpt/internlm2-chat-7b --dtype bfloat16
    internlm-jax chat --url http://127.0.0.1:23333 --api-key sk-1
    internlm-jax chat --model internlm2-tiny --tokenizer /tmp/tok --tools tools.json

Replies stream as they are generated; the conversation is kept (history) until /reset. Commands:
/exit (or /quit, Ctrl-D), /reset, /system TEXT (set the system prompt and reset), /help. A line ending
in a backslash continues on the next line. With --tools (a JSON file holding an OpenAI `tools` list) the
model may call a tool: the call is printed as `[tool call] name(arguments)` and you type the tool's result
(empty line: skip), which goes back to the model as a `tool` message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from internlm_jax.config import ConfigError

HELP = "commands: /exit  /reset  /system TEXT  /help   (end a line with \\ to continue it)"
Delta = tuple[str, Any]  # ("content", str) | ("tool_call", dict) | ("done", finish_reason)


class LocalBackend:
    """Generates in this process: template -> engine (stepped on this thread) -> parser -> deltas."""

    def __init__(self, lm: Any, engine: Any, args: argparse.Namespace, tools: list | None):
        from internlm_jax import chat as chat_lib
        from internlm_jax.serve.streaming import TextFilter

        if lm.tokenizer is None:
            raise ConfigError("chat needs a tokenizer: pass --tokenizer DIR (tokenizer.model + tokenizer_config.json)")
        self.lm, self.engine, self.args, self.tools = lm, engine, args, tools
        self._chat, self._filter_cls = chat_lib, TextFilter

    def reply(self, messages: list[dict]) -> Iterator[Delta]:
        from internlm_jax.engine import SamplingParams

        tok, chat_lib = self.lm.tokenizer, self._chat
        ids = chat_lib.encode_chat(tok, messages, tools=self.tools)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            raise ConfigError(f"the conversation has {len(ids)} tokens, over the context of "
                              f"{self.engine.max_model_len}; /reset to start again")
        sp = SamplingParams(max_tokens=min(self.args.max_tokens, room), temperature=self.args.temperature,
                            top_p=self.args.top_p, stop_token_ids=tuple(tok.stop_token_ids(tools=bool(self.tools))),
                            seed=self.args.seed)
        events: list[Any] = []
        rid = self.engine.add_request(ids, sp, on_event=events.append)
        parser = chat_lib.StreamingParser()
        filt = self._filter_cls(list(tok.special_tokens) + list(chat_lib.CHAT_SPECIAL_TOKENS))
        finished = None
        try:
            while finished is None:
                if not events and self.engine.step() == 0:
                    raise RuntimeError("the engine stopped with the request unfinished")
                batch, events[:] = list(events), []
                for ev in batch:
                    out = parser.feed(ev.text)
                    text, calls = out.content, list(out.tool_calls)
                    if ev.finished:
                        end = parser.finish()
                        text, calls, finished = text + end.content, calls + end.tool_calls, ev.finish_reason
                    text = filt.feed(text) + (filt.flush() if ev.finished else "")
                    if text:
                        yield ("content", text)
                    for c in calls:
                        yield ("tool_call", c)
        finally:
            if finished is None:  # interrupted (Ctrl-C) or failed: free the request's slot and pages
                self.engine.abort(rid)
        yield ("done", finished)


class RemoteBackend:
    """Streams from an OpenAI-compatible server's /v1/chat/completions."""

    def __init__(self, url: str, args: argparse.Namespace, tools: list | None):
        import httpx

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(600.0, connect=10.0))
        self.args, self.tools = args, tools
        self.model = args.served_model_name
        if self.model is None:
            r = self.client.get(self.url + "/models")
            _raise_for(r)
            self.model = r.json()["data"][0]["id"]

    def reply(self, messages: list[dict]) -> Iterator[Delta]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "max_tokens": self.args.max_tokens, "temperature": self.args.temperature,
                                "top_p": self.args.top_p}
        if self.args.seed is not None:
            body["seed"] = self.args.seed
        if self.tools:
            body["tools"] = self.tools
        try:
            yield from self._post(body)
        except _ContextFull:
            body.pop("max_tokens")  # --max-tokens does not fit after this conversation: use what is left
            yield from self._post(body)

    def _post(self, body: dict) -> Iterator[Delta]:
        finish = None
        with self.client.stream("POST", self.url + "/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith(
                    "application/json") else {}
                if err.get("code") == "context_length_exceeded" and err.get("param") == "max_tokens":
                    raise _ContextFull()
                _raise_for(r)
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        yield ("content", delta["content"])
                    for call in delta.get("tool_calls") or []:
                        yield ("tool_call", {"id": call.get("id"), "type": "function", "function": call["function"]})
                    finish = choice.get("finish_reason") or finish
        yield ("done", finish)


class _ContextFull(Exception):
    pass


def _raise_for(r: Any) -> None:
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):  # not our JSON error shape
            msg = r.text[:300]
        raise RuntimeError(f"server answered {r.status_code}: {msg}")


_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7f, 0xa0)] if chr(i) not in "\n\t"}
_CONTROL.update({ord("\r"): "\\r", 0x1b: "\\x1b"})


def printable(text: str) -> str:
    """Model text made safe for a terminal: control characters (ESC, CR, BEL, backspace, C1 codes ...) are shown
    escaped (`\\x1b`, `\\r`), so a reply cannot move the cursor, rewrite lines or drive the terminal;
    newlines and tabs stay."""
    return text.translate(_CONTROL)


def _read(stdin: TextIO, stdout: TextIO, prompt: str) -> str | None:
    stdout.write(prompt)
    stdout.flush()
    lines = []
    while True:
        line = stdin.readline()
        if not line:
            return None if not lines else "\n".join(lines)
        line = line.rstrip("\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            stdout.write("... ")
            stdout.flush()
            continue
        lines.append(line)
        return "\n".join(lines)


def _format_call(call: dict) -> str:
    args = call["function"].get("arguments", "")
    try:
        args = json.dumps(json.loads(args), ensure_ascii=False)
    except (TypeError, json.JSONDecodeError):
        pass
    return printable(f"[tool call] {call['function']['name']}({args})")


def run_chat(backend: Any, system: str | None, stdin: TextIO, stdout: TextIO) -> int:
    """The conversation loop. Ctrl-C while a reply streams stops that reply (the turn is dropped); Ctrl-C at the
    prompt leaves (exit code 130)."""
    history: list[dict] = []
    stdout.write(HELP + "  (Ctrl-C stops a reply)\n")
    pending_tool_turn = False
    while True:
        if not pending_tool_turn:
            try:
                text = _read(stdin, stdout, "\nuser> ")
            except KeyboardInterrupt:
                stdout.write("\n")
                return 130
            if text is None:
                stdout.write("\n")
                return 0
            cmd = text.strip()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/help":
                stdout.write(HELP + "\n")
                continue
            if cmd == "/reset":
                history.clear()
                stdout.write("(conversation reset)\n")
                continue
            if cmd.startswith("/system"):
                system = cmd[len("/system"):].strip() or None
                history.clear()
                stdout.write(f"(system prompt {'set' if system else 'cleared'}; conversation reset)\n")
                continue
            if cmd.startswith("/"):
                stdout.write(f"unknown command {cmd.split()[0]!r}; {HELP}\n")
                continue
            if not cmd:
                continue
            history.append({"role": "user", "content": text})
        pending_tool_turn = False
        messages = ([{"role": "system", "content": system}] if system else []) + history
        stdout.write("assistant> ")
        stdout.flush()
        content, calls, finish = "", [], None
        try:
            for kind, value in backend.reply(messages):
                if kind == "content":
                    content += value
                    stdout.write(printable(value))
                    stdout.flush()
                elif kind == "tool_call":
                    calls.append(value)
                    stdout.write(("\n" if content or len(calls) > 1 else "") + _format_call(value))
                    stdout.flush()
                else:
                    finish = value
        except (RuntimeError, ConfigError) as e:
            stdout.write(f"\n[error] {printable(str(e))}\n")
            history.pop()
            continue
        except KeyboardInterrupt:
            stdout.write("\n[reply stopped; this turn was dropped]\n")
            history.pop()
            continue
        if finish == "length":
            stdout.write(" [cut at --max-tokens]")
        stdout.write("\n")
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        history.append(msg)
        if calls:
            answered = False
            for call in calls:
                result = _read(stdin, stdout, f"tool result for {call['function']['name']}> ")
                if result is None:
                    return 0
                if result.strip():
                    history.append({"role": "tool", "content": result, "tool_call_id": call.get("id"),
                                    "name": call["function"]["name"]})
                    answered = True
            pending_tool_turn = answered


def build_parser() -> argparse.ArgumentParser:
    from internlm_jax.serve.loading import add_model_args

    p = argparse.ArgumentParser(prog="internlm-jax chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, required=False)
    g = p.add_argument_group("chat")
    g.add_argument("--url", default=None, help="talk to a running server instead of loading the model")
    g.add_argument("--api-key", default=None, help="with --url: the server's API key")
    g.add_argument("--served-model-name", "--served-model", dest="served_model_name", default=None,
                   help="with --url: model id (default: the server's)")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--tools", default=None, help="JSON file with an OpenAI tools list")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.8)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, stdout = sys.stdin, sys.stdout
    try:
        tools = None
        if args.tools:
            with open(args.tools, encoding="utf-8") as f:
                tools = json.load(f)
            if not isinstance(tools, list):
                raise ConfigError(f"--tools {args.tools}: expected a JSON list of tools")
        if args.url:
            backend: Any = RemoteBackend(args.url, args, tools)
        else:
            if not args.model:
                raise ConfigError("give --model (to load it here) or --url (to use a running server)")
            import time

            from internlm_jax.serve.loading import build_engine, load_lm

            t0 = time.perf_counter()
            note = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress, off stdout
            note(f"loading {args.model} ...")
            lm, random_weights = load_lm(args)
            if lm.tokenizer is None:  # before the warm-up: it is the expensive part
                raise ConfigError(f"{args.model} has no tokenizer (tokenizer.model + tokenizer_config.json), and chat "
                                  "needs one to turn your text into tokens: pass --tokenizer DIR (e.g. the folder "
                                  "of the tokenizer the model was trained with)")
            if random_weights:
                stdout.write(f"(note: {args.model} is a preset with RANDOM weights; replies are noise)\n")
            args.max_batch = min(args.max_batch, 4)  # one conversation: few slots, fewer compiled shapes
            from internlm_jax.serve.loading import WarmupReporter

            engine = build_engine(lm, args, progress=WarmupReporter(emit=note))
            note(f"ready in {time.perf_counter() - t0:.1f} s (step programs: {engine.warmup_origin})")
            backend = LocalBackend(lm, engine, args, tools)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"internlm-jax chat: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninternlm-jax chat: interrupted while starting", file=sys.stderr)
        return 130
    return run_chat(backend, args.system, stdin, stdout)


if __name__ == "__main__":
    sys.exit(main())
