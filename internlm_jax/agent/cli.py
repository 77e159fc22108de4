"""`internlm-jax agent`: an interactive tool-using agent in the terminal.

    internlm-jax agent --model /ckpt/internlm2-chat-7b --tools python,calculator
    internlm-jax agent --url http://127.0.0.1:23333/v1 --served-model internlm2 --tools calculator,files
    echo "what is 2**10?" | internlm-jax agent --model internlm2-tiny --tokenizer /tmp/tok --tools calculator

Tools: `python` (the sandboxed code interpreter, InternLM2's <|interpreter|>; its working folder is a fresh
temporary one), `calculator`, `files` (read_file, limited to --workspace, default the current folder).
Each line you type is one user turn; the agent calls tools until it answers or --max-turns model calls pass,
and every step is printed as it happens. The conversation (tool turns included) is kept until /reset.
Commands: /exit (or /quit, Ctrl-D), /reset, /help. Works with piped stdin.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, TextIO

from internlm_jax.config import ConfigError

HELP = "commands: /exit  /reset  /help"
TOOL_NAMES = ("python", "calculator", "files")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internlm-jax agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="HF folder | internlm-jax checkpoint | preset (random weights)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1, "
                   "instead of loading --model here")
    g.add_argument("--served-model", "--served-model-name", dest="served_model", default=None,
                   help="with --url: the model id (default: the server's first)")
    g.add_argument("--api-key", default=None, help="with --url: the API key")
    a = p.add_argument_group("agent")
    a.add_argument("--tools", default="python,calculator", help=f"comma-separated, from {', '.join(TOOL_NAMES)}"
                   " ('' for none)")
    a.add_argument("--workspace", default=None, help="folder the `files` tool may read (default: current folder)")
    a.add_argument("--max-turns", type=int, default=8, help="model calls per user turn before giving up")
    a.add_argument("--system", default=None, help="system prompt")
    a.add_argument("--max-tokens", type=int, default=None, help="longest reply per model call (default: 512 "
                   "here, capped by the context left; with --url, the server's default)")
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=0, help="sampling seed (and random-weight seed for presets)")
    return p


def make_tools(spec: str, workspace: str | None, stack: contextlib.ExitStack) -> tuple[list[Any], Any]:
    """(plugin tools, interpreter or None) for a `--tools` spec."""
    from internlm_jax.agent.builtin import PythonInterpreter, calculator_tool, file_reader

    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOL_NAMES]
    if unknown:
        raise ConfigError(f"--tools: unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOL_NAMES)}")
    tools: list[Any] = []
    interpreter = None
    if "calculator" in names:
        tools.append(calculator_tool)
    if "files" in names:
        root = workspace or os.getcwd()
        if not os.path.isdir(root):
            raise ConfigError(f"--workspace {root!r} is not a folder")
        tools.append(file_reader(root))
    if "python" in names:
        interpreter = stack.enter_context(PythonInterpreter())
    return tools, interpreter


def make_backend(args: argparse.Namespace, out: TextIO) -> Any:
    from internlm_jax.agent.backends import OpenAIChatBackend

    if args.url:
        if args.model:
            raise ConfigError("give --model or --url, not both")
        model = args.served_model or _first_model(args.url, args.api_key)
        params = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
        if args.max_tokens is not None:
            params["max_tokens"] = args.max_tokens
        return OpenAIChatBackend(args.url, model, api_key=args.api_key, **params)
    if not args.model:
        raise ConfigError("give --model (to run it here) or --url (an OpenAI-compatible server)")
    import internlm_jax as ij
    from internlm_jax.agent.local import LocalBackend
    from internlm_jax.config import PRESETS

    lm = ij.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, random_weights=True, seed=args.seed)
    random_weights = not os.path.exists(args.model) and args.model in PRESETS
    if random_weights:
        out.write(f"(note: {args.model} is a preset with RANDOM weights; replies are noise)\n")
    return LocalBackend(lm, max_new_tokens=args.max_tokens or 512, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)


def _first_model(url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=30.0)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach {url}: {e}; is the server running, and does the URL end in /v1?") from e
    if r.status_code != 200:
        raise ConfigError(f"{url}/models answered HTTP {r.status_code}; pass --served-model NAME")
    data = r.json().get("data") or []
    if not data:
        raise ConfigError(f"{url}/models lists no model; pass --served-model NAME")
    return str(data[0]["id"])


def print_event(event: Any, out: TextIO) -> None:
    """One agent event, readably."""
    if event.type == "thought":
        out.write(f"thought> {event.content}\n")
    elif event.type == "tool_call":
        if "\n" in event.content:
            out.write(f"[tool call] {event.name}:\n{event.content}\n")
        else:
            out.write(f"[tool call] {event.content}\n")
    elif event.type == "tool_result":
        status = "" if event.result is None or event.result.ok else " (error)"
        out.write(f"[tool result{status}] {event.content}\n")
    elif event.type == "answer":
        out.write(f"assistant> {event.content}\n")
    else:
        out.write(f"[error] {event.content}\n")
    out.flush()


def run_repl(agent: Any, stdin: TextIO, out: TextIO) -> int:
    """Read user lines until EOF or /exit; run the agent on each, printing its events as they come."""
    history: list[dict[str, Any]] = []
    out.write(HELP + "\n")
    while True:
        out.write("\nuser> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return 0
        text = line.rstrip("\n").strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/help":
            out.write(HELP + "\n")
            continue
        if text == "/reset":
            history.clear()
            out.write("(conversation reset)\n")
            continue
        if not text:
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]!r}; {HELP}\n")
            continue
        transcript: list[dict[str, Any]] = []
        ended_with_answer = False
        for event in agent.run(history + [{"role": "user", "content": text}], transcript):
            print_event(event, out)
            ended_with_answer = event.type == "answer"
        # a run that ended in an error keeps its turns out of the history: the next question starts clean
        if ended_with_answer:
            history = transcript


def main(argv: list[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    from internlm_jax.agent.loop import Agent

    with contextlib.ExitStack() as stack:
        try:
            if args.max_turns < 1:
                raise ConfigError(f"--max-turns must be at least 1, got {args.max_turns}")
            tools, interpreter = make_tools(args.tools, args.workspace, stack)
            backend = make_backend(args, stdout)
            agent = Agent(backend, tools, interpreter=interpreter, system=args.system, max_turns=args.max_turns)
        except (ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            print(f"internlm-jax agent: {e}", file=sys.stderr)
            return 2
        names = [t.name for t in agent.toolkit] + (["python (interpreter)"] if interpreter is not None else [])
        stdout.write(f"tools: {', '.join(names) or 'none'}\n")
        return run_repl(agent, stdin, stdout)


if __name__ == "__main__":
    sys.exit(main())


# ---- `internlm-jax tools serve` ---------------------------------------------------------------------------

TOOLS_DOC = """`internlm-jax tools serve`: our tools for other programs and agent systems, in one command.

    internlm-jax tools serve --tools calculator,python                    # our HTTP protocol: POST /tools/{name}
    internlm-jax tools serve --mcp --tools calculator,python,files        # MCP over streamable HTTP, path /mcp
    internlm-jax tools serve --mcp --transport stdio --tools python       # MCP over stdin/stdout (one client)

Tools: `python` (the sandboxed interpreter, served as the tool `python_interpreter`: one stateful session
shared by the server's clients), `calculator`, `files` (read_file inside --workspace). Tool schemas come from
the tools' type hints, as in the agent. Binds 127.0.0.1 unless --host says otherwise: the tools run with this
process's rights (the interpreter inside its sandbox).
"""


def build_tools_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internlm-jax tools", description=TOOLS_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("serve", help="serve tools over HTTP or MCP", description=TOOLS_DOC,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--tools", default="python,calculator", help=f"comma-separated, from {', '.join(TOOL_NAMES)}")
    s.add_argument("--workspace", default=None, help="folder the `files` tool may read (default: current folder)")
    s.add_argument("--mcp", action="store_true", help="speak the Model Context Protocol (default: our HTTP protocol)")
    s.add_argument("--transport", default="streamable-http", choices=["streamable-http", "stdio"],
                   help="with --mcp: streamable HTTP (default) or stdio")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--call-timeout", type=float, default=None,
                   help="with --mcp: seconds after which a tool call is answered with a timeout error")
    return p


def tools_main(argv: list[str] | None = None) -> int:
    args = build_tools_parser().parse_args(argv)
    if args.transport != "streamable-http" and not args.mcp:
        print("internlm-jax tools serve: --transport applies to --mcp only", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        try:
            tools, interpreter = make_tools(args.tools, args.workspace, stack)
            if interpreter is not None:
                tools.append(interpreter.tool)
            if not tools:
                raise ConfigError("--tools: name at least one tool")
            if args.call_timeout is not None and args.call_timeout <= 0:
                raise ConfigError(f"--call-timeout must be positive seconds, got {args.call_timeout}")
            from internlm_jax.agent.tools import Toolkit

            toolkit = Toolkit(tools)
            if args.mcp:
                from internlm_jax.agent import mcp

                server = mcp.create_mcp_server(toolkit, call_timeout=args.call_timeout)
        except (ConfigError, ImportError, ValueError, OSError) as e:
            print(f"internlm-jax tools serve: {e}", file=sys.stderr)
            return 2
        names = ", ".join(toolkit.names)
        if args.mcp and args.transport == "stdio":
            print(f"internlm-jax tools: MCP over stdio, tools: {names}", file=sys.stderr)
            mcp.serve_mcp_stdio(server)
        elif args.mcp:
            print(f"internlm-jax tools: MCP at http://{args.host}:{args.port}{mcp.DEFAULT_PATH}, tools: {names}",
                  file=sys.stderr)
            mcp.serve_mcp_http(server, host=args.host, port=args.port)
        else:
            import uvicorn

            from internlm_jax.agent.tool_server import create_tool_app

            print(f"internlm-jax tools: HTTP at http://{args.host}:{args.port}/tools, tools: {names}", file=sys.stderr)
            uvicorn.run(create_tool_app(toolkit), host=args.host, port=args.port, log_level="info", lifespan="off")
    return 0
