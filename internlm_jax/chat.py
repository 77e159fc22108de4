"""InternLM2 chat template and tool-call protocol: render OpenAI-style messages, parse completions.

Format (see shared/INTERNLM2.md), one turn per message, the whole prompt starting with "<s>":

    <|im_start|>{role}[ name=<|plugin|>|<|interpreter|>]\\n{content}<|im_end|>\\n

A generation prompt ends with "<|im_start|>assistant\\n". Choices, matching LMDeploy's InternLM2 template:
- `tools` (OpenAI `tools[i].function` objects) become one `system name=<|plugin|>` turn whose content is
  `json.dumps([function, ...], ensure_ascii=False)` (default separators ", " and ": "), placed after the
  first message if that is a system message, else first. Functions are dumped as given (LMDeploy dumps its
  pydantic model, which adds `"description": null` / `"parameters": null` when they are absent). `interpreter=True` (or a prompt string) adds a
  `system name=<|interpreter|>` turn just before it.
- An assistant message's `tool_calls` are appended to its content as `<|action_start|><|plugin|>\\n`
  + `json.dumps({"name": ..., "parameters": {...}}, ensure_ascii=False)` + `<|action_end|>`
  (`arguments`, a JSON string or dict, renamed `parameters`). A call of the interpreter (function name
  "python" while the interpreter is enabled, arguments {"code": ...}) renders as
  `<|action_start|><|interpreter|>\\n```python\\n{code}\\n```<|action_end|>`.
- A `tool` message becomes an `environment name=<|plugin|>` turn (`name=<|interpreter|>` when it answers an
  interpreter call). LMDeploy writes a bare `environment` header here; we follow InternLM2's own protocol
  (Lagent, INTERNLM2.md), which names the plugin.
- A dict `content` of a `tool`/`environment` message is JSON-encoded the same way.
- A message with `name` "plugin" or "interpreter" gets that name in its header (as in LMDeploy).
- No default system prompt is inserted (LMDeploy inserts InternLM's meta instruction when the first message
  is not a system message; pass `default_system=` for that behaviour).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from internlm_jax.tokenizer import (
    ACTION_END,
    ACTION_START,
    BOS,
    CHAT_SPECIAL_TOKENS,
    EOS,
    IM_END,
    IM_START,
    INTERPRETER,
    PLUGIN,
    TokenizerError,
)

__all__ = ["ACTION_END", "ACTION_START", "BOS", "CHAT_SPECIAL_TOKENS", "DEFAULT_INTERPRETER_PROMPT", "EOS",
           "IM_END", "IM_START", "INTERPRETER", "INTERPRETER_TOOL_NAME", "PLUGIN", "STOP_WORDS",
           "TOOL_STOP_WORDS", "Segment", "StreamDelta", "StreamingParser", "TemplateError", "encode_chat",
           "encode_segments", "parse_completion", "render", "render_segments", "render_training", "stop_words"]

STOP_WORDS: list[str] = [IM_END]
TOOL_STOP_WORDS: list[str] = [IM_END, ACTION_END]
INTERPRETER_TOOL_NAME = "python"
DEFAULT_INTERPRETER_PROMPT = (
    "You can run Python code in a stateful Jupyter notebook environment. Send a message containing Python "
    "code to python and it will be executed there; use it for calculation, data analysis, plotting, text "
    "processing and file handling.")

_NAME_TOKENS = {"plugin": PLUGIN, "interpreter": INTERPRETER}
_ROLES = ("system", "user", "assistant", "tool", "environment")


class TemplateError(ValueError):
    """Messages or tools that cannot be rendered; the message says which one and why."""


Segment = tuple[str, bool]  # (text, is_control): a control segment is one special token of the template


def _ctl(name: str) -> Segment:
    return (name, True)


def _txt(text: str) -> Segment:
    return (text, False)


def _join(segments: Iterable[Segment]) -> str:
    return "".join(text for text, _ in segments)


def stop_words(tools: bool = False) -> list[str]:
    """Strings that end a reply: <|im_end|>, and <|action_end|> too when tools or the interpreter are on."""
    return list(TOOL_STOP_WORDS if tools else STOP_WORDS)


# ----- rendering ----------------------------------------------------------------------------------------
def _text(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise TemplateError(f"{where}.content[{i}] must be {{'type': 'text', 'text': str}}; "
                                    f"InternLM2 is text-only, got {part!r}")
        return "".join(parts)
    raise TemplateError(f"{where}.content must be a string, null or a list of text parts, got "
                        f"{type(content).__name__}")


def _tool_functions(tools: Sequence[Any]) -> list[dict]:
    """OpenAI tools ({"type": "function", "function": {...}}) or bare function dicts -> function dicts."""
    if isinstance(tools, (str, bytes, dict)):
        raise TemplateError("tools must be a list of tool objects, e.g. [{'type': 'function', 'function': "
                            "{'name': ..., 'description': ..., 'parameters': {...}}}]")
    functions = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            if tool.get("type", "function") != "function":
                raise TemplateError(f"tools[{i}].type is {tool.get('type')!r}; only 'function' tools exist")
            fn = tool["function"]
        elif isinstance(tool, dict) and "name" in tool:
            fn = tool
        else:
            raise TemplateError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}, "
                                f"got {tool!r}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise TemplateError(f"tools[{i}].function.name must be a non-empty string")
        functions.append(fn)
    return functions


def _call_arguments(arguments: Any, where: str) -> Any:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError as err:
            raise TemplateError(
                f"{where}.function.arguments is not valid JSON ({err}): {arguments!r}") from None
    return arguments


def _action_block(call: Any, where: str, interpreter: bool) -> tuple[list[Segment], bool]:
    """One assistant tool call -> (action segments, is_interpreter_call)."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TemplateError(
            f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    fn = call["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise TemplateError(f"{where}.function.name must be a non-empty string")
    params = _call_arguments(fn.get("parameters", fn.get("arguments")), where)
    if interpreter and name == INTERPRETER_TOOL_NAME:
        if not isinstance(params, dict) or not isinstance(params.get("code"), str):
            raise TemplateError(f"{where} calls the interpreter ({INTERPRETER_TOOL_NAME!r}) and needs "
                                f"arguments {{'code': str}}, got {params!r}")
        return [_ctl(ACTION_START), _ctl(INTERPRETER), _txt(f"\n```python\n{params['code']}\n```"),
                _ctl(ACTION_END)], True
    body = json.dumps({"name": name, "parameters": params}, ensure_ascii=False)
    return [_ctl(ACTION_START), _ctl(PLUGIN), _txt(f"\n{body}"), _ctl(ACTION_END)], False


@dataclass
class _Turn:
    role: str
    header: list[Segment]  # "<|im_start|>role[ name=...]\n"
    body: list[Segment]
    loss: bool


def _turns(messages: Sequence[dict], tools: Sequence[Any] | None, interpreter: bool | str,
           default_system: str | None) -> list[_Turn]:
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise TemplateError(f"messages[{i}] must be a dict with a 'role', got {m!r}")
        if m["role"] not in _ROLES:
            raise TemplateError(f"messages[{i}].role is {m['role']!r}; expected one of {list(_ROLES)}")
    extra: list[dict] = []
    if interpreter:
        prompt = interpreter if isinstance(interpreter, str) else DEFAULT_INTERPRETER_PROMPT
        extra.append({"role": "system", "name": "interpreter", "content": prompt})
    if tools:
        extra.append({"role": "system", "name": "plugin",
                      "content": json.dumps(_tool_functions(tools), ensure_ascii=False)})
    if default_system is not None and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": default_system})
    at = 1 if msgs and msgs[0]["role"] == "system" else 0
    msgs[at:at] = extra

    interpreter_call_ids: set[str] = set()
    turns = []
    for i, m in enumerate(msgs):
        role = m["role"]
        where = f"messages[{i}]"
        content = m.get("content")
        if role in ("tool", "environment") and isinstance(content, dict):
            content = json.dumps(content, ensure_ascii=False)  # a structured tool result, as Lagent sends it
        text = _text(content, where)
        body = [_txt(text)] if text else []
        name = m.get("name")
        if role == "assistant" and m.get("tool_calls"):
            for j, call in enumerate(m["tool_calls"]):
                block, is_interp = _action_block(call, f"{where}.tool_calls[{j}]", bool(interpreter))
                body += block
                if is_interp and isinstance(call.get("id"), str):
                    interpreter_call_ids.add(call["id"])
        if role == "tool":
            answers_interp = name == "interpreter" or (name == INTERPRETER_TOOL_NAME and bool(interpreter)) \
                or m.get("tool_call_id") in interpreter_call_ids
            role, name = "environment", "interpreter" if answers_interp else "plugin"
        header = [_ctl(IM_START), _txt(role)]
        if name in _NAME_TOKENS:
            header += [_txt(" name="), _ctl(_NAME_TOKENS[name])]
        header.append(_txt("\n"))
        loss = m.get("loss", role == "assistant")
        if not isinstance(loss, bool):
            raise TemplateError(f"{where}.loss must be true or false, got {loss!r}")
        turns.append(_Turn(role, header, body, loss))
    return turns


def render_segments(messages: Sequence[dict], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True, interpreter: bool | str = False, *, bos: bool = True,
                    default_system: str | None = None) -> list[Segment]:
    """Like render(), as [(text, is_control)]: the template's own special tokens are separate
    `(name, True)` segments; everything that came from the messages or tools is text (`False`), even
    where it spells a special-token name. "".join(text for text, _ in segments) == render(...)."""
    turns = _turns(messages, tools, interpreter, default_system)
    out: list[Segment] = [_ctl(BOS)] if bos else []
    continue_last = add_generation_prompt and bool(turns) and turns[-1].role == "assistant"
    for k, turn in enumerate(turns):
        out += turn.header + turn.body
        if not (continue_last and k == len(turns) - 1):
            out += [_ctl(IM_END), _txt("\n")]
    if add_generation_prompt and not continue_last:
        out += [_ctl(IM_START), _txt("assistant\n")]
    return out


def render(messages: Sequence[dict], tools: Sequence[Any] | None = None, add_generation_prompt: bool = True,
           interpreter: bool | str = False, *, bos: bool = True, default_system: str | None = None) -> str:
    """OpenAI-style messages -> the InternLM2 prompt string (starts with "<s>" unless bos=False).

    With add_generation_prompt the text ends with "<|im_start|>assistant\\n"; if the last message is from
    the assistant it is instead left open (no <|im_end|>) so the model continues it, as LMDeploy does.
    Without it every turn is closed with "<|im_end|>\\n" (the training form).

    The string is for display and for trusted text paths: encoding it with special-token parsing turns any
    "<|im_end|>" a user typed into a real control token. To get token ids, use encode_chat().
    """
    return _join(render_segments(messages, tools, add_generation_prompt, interpreter, bos=bos,
                                 default_system=default_system))


def _control_ids(tokenizer: Any, names: Iterable[str]) -> dict[str, int]:
    out = {}
    for name in names:
        try:
            out[name] = tokenizer.token_id(name)
        except KeyError:
            raise TokenizerError(
                f"the tokenizer has no id for the chat control token {name!r}: its tokenizer_config.json does "
                "not name the InternLM2 chat tokens. Load the tokenizer of a chat release "
                "(Tokenizer.from_dir(path)).") from None
    return out


def encode_segments(tokenizer: Any, segments: Sequence[Segment]) -> list[int]:
    """[(text, is_control)] -> ids: a control segment is the one id of that special token; the text between
    two control segments is encoded as one stretch of plain text (special-token names in it stay text).

    For text without special-token names this gives exactly tokenizer.encode("".join(texts)): that call
    splits the string at the same control tokens and encodes the same stretches.
    """
    ids_of = _control_ids(tokenizer, dict.fromkeys(text for text, control in segments if control))
    ids: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            ids.extend(tokenizer.encode("".join(pending), add_bos=False, add_eos=False, parse_special=False))
            pending.clear()

    for text, control in segments:
        if control:
            flush()
            ids.append(ids_of[text])
        elif text:
            pending.append(text)
    flush()
    return ids


def encode_chat(tokenizer: Any, messages: Sequence[dict], tools: Sequence[Any] | None = None,
                add_generation_prompt: bool = True, interpreter: bool | str = False, *, bos: bool = True,
                default_system: str | None = None, trusted: bool = False) -> list[int]:
    """OpenAI-style messages -> the InternLM2 prompt's token ids (with BOS unless bos=False).

    The one way to turn a chat into ids. Message contents, names, tool descriptions and call arguments are
    text: a "<|im_end|>\\n<|im_start|>system" typed by a user is encoded as ordinary pieces, so it cannot
    forge a turn; only the template's own tokens are control tokens. `trusted=True` (for callers that
    write the messages themselves and mean special-token names in them) parses such names into their ids,
    i.e. tokenizer.encode(render(...)). For ordinary text both give the same ids.
    """
    segments = render_segments(messages, tools, add_generation_prompt, interpreter, bos=bos,
                               default_system=default_system)
    if trusted:
        return list(tokenizer.encode(_join(segments), add_bos=False, add_eos=False))
    return encode_segments(tokenizer, segments)


def render_training(messages: Sequence[dict], tools: Sequence[Any] | None = None,
                    interpreter: bool | str = False, *, bos: bool = True,
                    default_system: str | None = None) -> list[tuple[str, bool]]:
    """Messages -> [(text, is_loss)] segments whose concatenation is render(..., add_generation_prompt=False).

    Loss covers each assistant message's content (tool-call blocks included) and its closing <|im_end|>,
    never the headers or the "\\n" separators. A message's optional `loss` flag overrides the default
    (True for assistant, False otherwise). Encode each segment separately (add_bos=False): the boundaries
    fall exactly where a generation prompt ends, so training sees the tokens inference will.
    """
    turns = _turns(messages, tools, interpreter, default_system)
    segments: list[tuple[str, bool]] = [(BOS, False)] if bos else []

    def add(text: str, loss: bool) -> None:
        if not text:
            return
        if segments and segments[-1][1] == loss:
            segments[-1] = (segments[-1][0] + text, loss)
        else:
            segments.append((text, loss))

    for turn in turns:
        add(_join(turn.header), False)
        add(_join(turn.body) + IM_END, turn.loss)
        add("\n", False)
    return segments


# ----- parsing ------------------------------------------------------------------------------------------
_FENCE_RE = re.compile(r"\A```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)\n?[ \t]*```\s*\Z", re.DOTALL)


def _default_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _strip_fences(code: str) -> str:
    code = code.strip()
    m = _FENCE_RE.match(code)
    if m:
        return m.group(1)
    if code.startswith("```"):  # unterminated block (generation stopped early): drop the opening line
        return code.split("\n", 1)[1] if "\n" in code else ""
    return code


def _parse_action(body: str, make_id: Callable[[], str]) -> dict | None:
    """Body between <|action_start|> and <|action_end|> -> an OpenAI tool call, or None if unparseable."""
    text = body.lstrip()
    if text.startswith(INTERPRETER):
        code = _strip_fences(text[len(INTERPRETER):])
        if not code.strip():
            return None
        name, args_json = INTERPRETER_TOOL_NAME, json.dumps({"code": code}, ensure_ascii=False)
    else:
        text = text.removeprefix(PLUGIN)
        start = text.find("{")
        if start < 0 or text[:start].strip():
            return None
        try:
            obj, _ = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj["parameters"] if "parameters" in obj else obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass  # keep a non-JSON string; it is passed on verbatim below
        args_json = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        name = obj["name"]
    return {"id": make_id(), "type": "function", "function": {"name": name, "arguments": args_json}}


def _raw_block(body: str, closed: bool) -> str:
    return ACTION_START + body + (ACTION_END if closed else "")


def parse_completion(text: str, *, make_id: Callable[[], str] | None = None) -> tuple[str, list[dict]]:
    """A model reply (special tokens kept as text) -> (content, tool_calls).

    The reply is cut at the first <|im_end|> or </s>. Each `<|action_start|><|plugin|>\\n{json}<|action_end|>`
    block becomes a call (`parameters` or `arguments` accepted); an `<|interpreter|>` block becomes a call of
    "python" with arguments {"code": ...} (fences removed). A block cut short (generation stopped on
    <|action_end|>) is parsed too. Text outside the blocks is the content. A block that does not parse is
    kept verbatim in the content rather than dropped. tool_calls are OpenAI-shaped:
    {"id", "type": "function", "function": {"name", "arguments": JSON string}}.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    make_id = make_id or _default_id
    cut = [i for i in (text.find(IM_END), text.find(EOS)) if i >= 0]
    if cut:
        text = text[:min(cut)]
    content: list[str] = []
    calls: list[dict] = []
    pos = 0
    while True:
        start = text.find(ACTION_START, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        body_at = start + len(ACTION_START)
        end = text.find(ACTION_END, body_at)
        closed = end >= 0
        body = text[body_at:end] if closed else text[body_at:]
        call = _parse_action(body, make_id)
        if call is None:
            content.append(_raw_block(body, closed))
        else:
            calls.append(call)
        if not closed:
            break
        pos = end + len(ACTION_END)
    return "".join(content), calls


@dataclass
class StreamDelta:
    """What one StreamingParser step produced: new content text and any tool calls completed."""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


_TEXT_STATE, _ACTION_STATE, _DONE_STATE = 0, 1, 2
_TEXT_WATCH = (ACTION_START, IM_END, EOS)
_ACTION_WATCH = (ACTION_END, IM_END, EOS)
_TEXT_RE = re.compile("|".join(map(re.escape, _TEXT_WATCH)))
_ACTION_RE = re.compile("|".join(map(re.escape, _ACTION_WATCH)))
_HOLD_PREFIXES = frozenset(t[:k] for t in _TEXT_WATCH for k in range(1, len(t)))
_MAX_TOKEN = max(map(len, _TEXT_WATCH + _ACTION_WATCH))


class StreamingParser:
    """Incremental parse_completion: feed text deltas, get content deltas and completed tool calls.

    Text that could be the start of <|action_start|>, <|im_end|> or </s> is held back until it is known
    not to be one, so a fragment such as "<|act" never reaches the content. A tool call is emitted when its
    block closes (or at finish() if generation stopped inside it). At the end, the concatenated content and
    the calls equal parse_completion(full text) (ids aside).
    """

    def __init__(self, *, make_id: Callable[[], str] | None = None) -> None:
        self._make_id = make_id or _default_id
        self._state = _TEXT_STATE
        self._buf = ""
        self._scan = 0  # in the action state: buf[:scan] holds no complete end token
        self.content = ""
        self.tool_calls: list[dict] = []

    @property
    def done(self) -> bool:
        """True once <|im_end|> or </s> was seen; later text is ignored."""
        return self._state == _DONE_STATE

    def _close_block(self, body: str, closed: bool, out: StreamDelta) -> None:
        call = _parse_action(body, self._make_id)
        if call is None:
            out.content += _raw_block(body, closed)
        else:
            out.tool_calls.append(call)

    def _step(self, out: StreamDelta, final: bool) -> None:
        while True:
            if self._state == _DONE_STATE:
                self._buf = ""
                return
            if self._state == _TEXT_STATE:
                m = _TEXT_RE.search(self._buf)
                if m:
                    out.content += self._buf[:m.start()]
                    self._buf = self._buf[m.end():]
                    self._state = _ACTION_STATE if m.group() == ACTION_START else _DONE_STATE
                    self._scan = 0
                    continue
                keep = 0
                if not final:
                    for k in range(min(len(self._buf), _MAX_TOKEN - 1), 0, -1):
                        if self._buf[-k:] in _HOLD_PREFIXES:
                            keep = k
                            break
                out.content += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return
            # action state: wait for the block to end
            m = _ACTION_RE.search(self._buf, max(0, self._scan - _MAX_TOKEN + 1))
            if m:
                body = self._buf[:m.start()]
                self._buf = self._buf[m.end():]
                closed = m.group() == ACTION_END
                self._close_block(body, closed, out)
                self._state = _TEXT_STATE if closed else _DONE_STATE
                continue
            self._scan = len(self._buf)
            if final:
                self._close_block(self._buf, False, out)
                self._buf = ""
                self._state = _DONE_STATE
            return

    def _record(self, out: StreamDelta) -> StreamDelta:
        self.content += out.content
        self.tool_calls.extend(out.tool_calls)
        return out

    def feed(self, delta: str) -> StreamDelta:
        if not isinstance(delta, str):
            raise TypeError(f"delta must be str, got {type(delta).__name__}")
        out = StreamDelta()
        if self._state != _DONE_STATE:
            self._buf += delta
            self._step(out, final=False)
        return self._record(out)

    def finish(self) -> StreamDelta:
        """End of generation: release held-back text and close an unterminated action block."""
        out = StreamDelta()
        self._step(out, final=True)
        return self._record(out)
