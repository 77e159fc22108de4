"""Supervised fine-tuning data: chat records -> token sequences with an assistant-only loss mask -> packed rows.

Record formats (one JSON object per line of a .jsonl file, or a .json file holding a list of objects):
- `messages`:     OpenAI chat, {"messages": [{"role", "content", "tool_calls"?, "loss"?}, ...], "tools"?: [...]};
                  roles system / user / assistant / tool; `loss` (bool) overrides the default per turn.
- `conversation`: XTuner, {"conversation": [{"system"?, "input", "output"}, ...]}; loss on each `output`.
- `alpaca`:       {"instruction", "input"?, "output"}; the user turn is instruction + "\\n" + input (as XTuner's
                  alpaca_map_fn), loss on output.
- `text`:         {"text": ...} raw text for continued pre-training: BOS + text + EOS, loss on every token;
                  a long text is split into consecutive pieces rather than truncated.
`auto` picks the format per record from its keys. Chats are rendered by `internlm_jax.chat.render_training`
(the InternLM2 template, tool calls included) and each segment is tokenised on its own, exactly where a
generation prompt ends, so training sees the tokens inference will. Loss covers assistant content and its
closing <|im_end|> only.

A sequence of n tokens gives n - 1 (input, target) positions. Over-long sequences (more than seq_len positions):
- truncation "turns": keep whole turns up to the last assistant answer that fits; if even the first answer does
  not fit, the sample is dropped. Both are counted and the first few are logged with file and line.
- "cut": cut at seq_len tokens (counted; cuts inside the first answer are counted separately);
- "error": stop with the file and line.
Packing puts whole samples (never split) into rows by best fit; each sample is its own segment (segment ids
1, 2, ...; 0 = padding) with positions restarting at 0, so attention never crosses samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from internlm_jax.config import ConfigError
from internlm_jax.data.packing import IGNORE
from internlm_jax.data.sources import DataError

log = logging.getLogger(__name__)

RecordFormat = Literal["auto", "messages", "conversation", "alpaca", "text", "dpo"]
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
MAX_LOGGED = 5  # per kind of dropped / truncated sample, the first few are logged with file and line


# ---- config ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SFTSource:
    """One data file. `path` may start with `assets:` (files shipped in internlm_jax/assets, e.g.
    `assets:sft/arithmetic.jsonl`). `max_samples` keeps the first N records; `repeat` uses them N times."""

    path: str
    format: RecordFormat = "auto"
    max_samples: int | None = None
    repeat: int = 1

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("a dataset source needs a path")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"dataset source {self.path}: max_samples must be >= 1 or null")
        if self.repeat < 1:
            raise ConfigError(f"dataset source {self.path}: repeat must be >= 1")


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """The `dataset:` section of a fine-tuning config.

    sources:    files (a path string or {path, format, max_samples, repeat}).
    tokenizer:  a tokenizer folder (tokenizer.model + tokenizer_config.json), `byte` (the byte tokenizer with
                the six chat tokens at ids 259..264; fits any model pre-trained with `tokenizer: byte`), or
                null: the model folder's own tokenizer.
    seq_len:    positions per row (T).
    pack:       several samples per row (else one sample per row, padded).
    truncation: turns | cut | error, for samples longer than seq_len (see the module docstring).
    bad_records: error (stop at the first bad record, naming file and line) | skip (drop and count it).
    system:     a system prompt for chats that have none (XTuner's SYSTEM template); null adds nothing.
    max_pairs_per_row: DPO only; 0 = as many as fit.
    """

    sources: tuple[SFTSource | str, ...]
    tokenizer: str | None = None
    seq_len: int = 2048
    pack: bool = True
    shuffle: bool = True
    truncation: Literal["turns", "cut", "error"] = "turns"
    bad_records: Literal["error", "skip"] = "error"
    system: str | None = None

    def __post_init__(self) -> None:
        sources = tuple(SFTSource(path=s) if isinstance(s, str) else s for s in self.sources)
        if not sources:
            raise ConfigError("dataset.sources is empty: list at least one jsonl/json file")
        object.__setattr__(self, "sources", sources)
        if self.seq_len < 4:
            raise ConfigError(f"dataset.seq_len must be >= 4, got {self.seq_len}")


# ---- tokenizers ------------------------------------------------------------------------------------------
class ChatByteTokenizer:
    """Bytes plus the InternLM2 special tokens, no model file: id 0 pad, 1 <s>, 2 </s>, byte b -> b + 3, then
    <|plugin|> <|interpreter|> <|action_end|> <|action_start|> <|im_end|> <|im_start|> at 259..264.

    Ids 0..258 are those of `internlm_jax.data.ByteTokenizer`, so a model pre-trained with `tokenizer: byte`
    can be fine-tuned on chats with this one (its vocab must be >= 265; the tiny presets have 1024)."""

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3

    def __init__(self) -> None:
        from internlm_jax.tokenizer import BOS, CHAT_SPECIAL_TOKENS, EOS

        self.special = {BOS: self.bos_id, EOS: self.eos_id}
        self.special.update({t: 256 + self.offset + i for i, t in enumerate(CHAT_SPECIAL_TOKENS)})
        self._by_id = {v: k for k, v in self.special.items()}
        self.vocab_size = 256 + self.offset + len(CHAT_SPECIAL_TOKENS)
        import re

        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special, key=len,
                                                                             reverse=True)) + ")")

    def token_id(self, token: str) -> int:
        if token not in self.special:
            raise KeyError(f"{token!r} is not a special token of the chat byte tokenizer")
        return self.special[token]

    @property
    def im_end_id(self) -> int:
        return self.special["<|im_end|>"]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, *,
               parse_special: bool = True) -> list[int]:
        ids: list[int] = []
        parts = self._split.split(text) if parse_special else [text]
        for i, part in enumerate(parts):
            if parse_special and i % 2:
                ids.append(self.special[part])
            else:
                ids.extend(b + self.offset for b in part.encode("utf-8"))
        if add_bos and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for t in (int(i) for i in ids):
            if self.offset <= t < 256 + self.offset:
                buf.append(t - self.offset)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if t in self._by_id and not skip_special_tokens:
                out.append(self._by_id[t])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def load_chat_tokenizer(spec: str | None, model_dir: str | None = None) -> Any:
    """`byte` -> ChatByteTokenizer; a folder -> internlm_jax.tokenizer.Tokenizer (chat tokens required);
    None -> the tokenizer in `model_dir`."""
    if spec in ("byte", "chat_byte"):
        return ChatByteTokenizer()
    folder = spec if spec else model_dir
    if not folder or not os.path.isdir(folder):
        raise ConfigError(f"dataset.tokenizer: {spec!r} is not a tokenizer folder; give a folder with "
                          "tokenizer.model and tokenizer_config.json (an InternLM2 chat checkpoint), or `byte`"
                          + ("" if spec else " (the model is a preset, so it has no tokenizer of its own)"))
    from internlm_jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(folder)


def resolve_path(path: str) -> str:
    if path.startswith("assets:"):
        return os.path.join(ASSETS, path[len("assets:"):])
    return os.path.expanduser(path)


# ---- records ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DataReport:
    """Counts of one data preparation, printed before training and saved in the run folder."""

    records: int = 0
    samples: int = 0
    skipped: int = 0  # bad records dropped with bad_records=skip
    truncated: int = 0  # samples shortened (later turns dropped, or cut)
    cut_in_first_answer: int = 0  # truncation=cut that cut into the first assistant answer
    dropped_too_long: int = 0  # the first assistant answer does not fit seq_len
    split_texts: int = 0  # raw texts split into several pieces
    loss_tokens: int = 0
    tokens: int = 0
    logged: dict[str, int] = dataclasses.field(default_factory=dict)

    def note(self, kind: str, where: str, message: str) -> None:
        n = self.logged.get(kind, 0) + 1
        self.logged[kind] = n
        if n <= MAX_LOGGED:
            log.warning("%s: %s", where, message)
        elif n == MAX_LOGGED + 1:
            log.warning("further %s samples are counted but not logged", kind)

    def as_dict(self) -> dict[str, int]:
        d = dataclasses.asdict(self)
        d.pop("logged")
        return d

    def summary(self) -> str:
        parts = [f"{self.samples} samples from {self.records} records",
                 f"{self.tokens:,} tokens ({self.loss_tokens:,} with loss)"]
        for name in ("skipped", "truncated", "cut_in_first_answer", "dropped_too_long", "split_texts"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')}: {getattr(self, name)}")
        return "; ".join(parts)


def iter_records(path: str) -> Iterator[tuple[str, Any, DataError | None]]:
    """(where, object, error) per record of a .jsonl file (blank lines skipped) or a .json list."""
    real = resolve_path(path)
    if not os.path.isfile(real):
        raise DataError(f"dataset file {path!r} does not exist (resolved to {os.path.abspath(real)})")
    if real.endswith(".json"):
        with open(real, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); a .json dataset holds one "
                                "list of records (use .jsonl for one record per line)") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must hold a list of records, got {type(data).__name__}")
        for i, obj in enumerate(data):
            yield f"{path} item {i}", obj, None
        return
    with open(real, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path} line {n}"
            try:
                yield where, json.loads(raw), None
            except UnicodeDecodeError as e:
                yield where, None, DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield where, None, DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line "
                                             "of a .jsonl file must be one JSON object")


def detect_format(obj: dict, where: str) -> str:
    if "messages" in obj:
        return "messages"
    if "conversation" in obj:
        return "conversation"
    if "chosen" in obj or "rejected" in obj:
        return "dpo"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    keys = ", ".join(map(repr, obj)) or "none"
    raise DataError(f"{where}: cannot tell the record format from its keys ({keys}); expected 'messages' "
                    "(OpenAI chat), 'conversation' (XTuner), 'instruction'/'output' (alpaca) or 'text'")


def _need(obj: dict, key: str, where: str, what: str, types: tuple[type, ...] = (str,)) -> Any:
    if key not in obj:
        keys = ", ".join(map(repr, obj)) or "none"
        raise DataError(f"{where}: {what} lacks the field {key!r} (it has {keys})")
    value = obj[key]
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"{where}: {what} field {key!r} must be a {names}, got {type(value).__name__}")
    return value


def record_to_messages(obj: Any, fmt: str, where: str, system: str | None = None
                       ) -> tuple[list[dict], list | None]:
    """A chat record of any format -> (OpenAI messages, tools). Raises DataError naming `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got a JSON {type(obj).__name__}")
    if fmt == "auto":
        fmt = detect_format(obj, where)
    tools = None
    if fmt == "messages":
        msgs = _need(obj, "messages", where, "the record", (list,))
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise DataError(f"{where}: messages[{i}] must be an object with a 'role', got {m!r}"[:300])
            if (m["role"] != "assistant" or not m.get("tool_calls")) and "content" not in m:
                raise DataError(f"{where}: messages[{i}] ({m['role']}) lacks the field 'content'")
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise DataError(f"{where}: 'tools' must be a list of tool objects")
        msgs = list(msgs)
    elif fmt == "conversation":
        conv = _need(obj, "conversation", where, "the record", (list,))
        if not conv:
            raise DataError(f"{where}: 'conversation' is empty")
        msgs = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: conversation[{i}] must be an object with 'input' and 'output'")
            if turn.get("system"):
                msgs.append({"role": "system", "content": _need(turn, "system", where, f"conversation[{i}]")})
            msgs.append({"role": "user", "content": _need(turn, "input", where, f"conversation[{i}]")})
            msgs.append({"role": "assistant", "content": _need(turn, "output", where, f"conversation[{i}]")})
    elif fmt == "alpaca":
        instruction = _need(obj, "instruction", where, "the alpaca record")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: alpaca field 'input' must be a string")
        output = _need(obj, "output", where, "the alpaca record")
        msgs = [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction},
                {"role": "assistant", "content": output}]
    else:
        raise DataError(f"{where}: format {fmt!r} is not a chat format")
    if system is not None and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs, tools


def render_segments(messages: list[dict], tools: list | None, where: str) -> list[tuple[str, bool]]:
    """The InternLM2 training segments of a chat; at least one assistant turn must carry loss."""
    from internlm_jax.chat import TemplateError, render_training

    try:
        segments = render_training(messages, tools=tools)
    except TemplateError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(loss for _, loss in segments):
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise DataError(f"{where}: no assistant turn to learn from (roles: {roles}); every training chat needs "
                        "at least one assistant message (with loss)")
    return segments


# ---- tokens ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Seq:
    """One token sequence: ids [n] and loss [n] (True where the token is a target that counts). `sign` is
    +1 / -1 for the chosen / rejected side of a DPO pair; `ref` [n-1] the reference log-prob of each target."""

    ids: np.ndarray
    loss: np.ndarray
    sign: int = 0
    ref: np.ndarray | None = None

    @property
    def positions(self) -> int:
        return len(self.ids) - 1


Unit = tuple[Seq, ...]  # what packing keeps together: one SFT sample, or a DPO pair


def tokenize_segments(tokenizer: Any, segments: Sequence[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    ids: list[int] = []
    loss: list[bool] = []
    for text, is_loss in segments:
        part = tokenizer.encode(text, add_bos=False, add_eos=False)
        ids.extend(part)
        loss.extend([is_loss] * len(part))
    last = max(i for i, f in enumerate(loss) if f) if any(loss) else len(ids) - 1
    # Tokens after the last loss token are never a target that counts and cannot influence one (causal).
    return np.asarray(ids[: last + 1], np.int32), np.asarray(loss[: last + 1], bool)


def loss_spans(loss: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of loss tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loss.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def fit_sequence(ids: np.ndarray, loss: np.ndarray, limit: int, policy: str, where: str, report: DataReport
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Apply the truncation policy so that the sequence has at most `limit` positions (limit + 1 tokens).
    None: the sample is dropped (counted)."""
    if len(ids) - 1 <= limit:
        return ids, loss
    spans = loss_spans(loss)
    first_end = spans[0][1] if spans else len(ids)
    if policy == "error":
        raise DataError(f"{where}: {len(ids)} tokens exceed seq_len={limit} positions; raise dataset.seq_len, "
                        "or set dataset.truncation to turns or cut")
    if policy == "cut":
        cut = limit + 1
        if not loss[1:cut].any():  # the cut leaves no assistant token to learn from
            report.dropped_too_long += 1
            report.note("dropped_too_long", where, f"dropped: no assistant token within seq_len={limit}")
            return None
        report.truncated += 1
        if first_end > cut:
            report.cut_in_first_answer += 1
            report.note("cut_in_first_answer", where, f"{len(ids)} tokens cut to {cut}, inside the first "
                        "assistant answer")
        return ids[:cut], loss[:cut]
    # "turns": end at the last whole assistant answer that fits
    fitting = [end for _, end in spans if end <= limit + 1]
    if not fitting:
        report.dropped_too_long += 1
        report.note("dropped_too_long", where, f"dropped: its first assistant answer ends at token {first_end}, "
                    f"beyond seq_len={limit}")
        return None
    report.truncated += 1
    report.note("truncated", where, f"{len(ids)} tokens: kept the turns up to token {fitting[-1]}")
    return ids[: fitting[-1]], loss[: fitting[-1]]


def text_pieces(tokenizer: Any, text: str, limit: int) -> list[Seq]:
    """Raw text -> BOS + text + EOS with loss on every target, split into pieces of at most `limit` positions
    (piece k covers tokens [k*limit, (k+1)*limit], so every target is predicted exactly once)."""
    ids = [tokenizer.bos_id, *tokenizer.encode(text, add_bos=False, add_eos=False, parse_special=False),
           tokenizer.eos_id]
    arr = np.asarray(ids, np.int32)
    out = []
    for start in range(0, len(arr) - 1, limit):
        piece = arr[start: start + limit + 1]
        out.append(Seq(piece, np.ones(len(piece), bool)))
    return out


def load_units(cfg: SFTDataConfig, tokenizer: Any, *, task: Literal["sft", "dpo"] = "sft",
               vocab_size: int | None = None) -> tuple[list[Unit], DataReport]:
    """Read, render, tokenise and fit every record of `cfg.sources` -> packing units and a report."""
    from internlm_jax.data import dpo as dpo_data

    report = DataReport()
    units: list[Unit] = []
    for src in cfg.sources:
        taken: list[Unit] = []
        for k, (where, obj, err) in enumerate(iter_records(src.path)):
            if src.max_samples is not None and k >= src.max_samples:
                break
            report.records += 1
            try:
                if err is not None:
                    raise err
                if task == "dpo":
                    unit = dpo_data.record_to_pair(obj, src.format, where, tokenizer, cfg, report)
                    got = [] if unit is None else [unit]
                else:
                    got = _sft_units(obj, src.format, where, tokenizer, cfg, report)
            except DataError as e:
                if cfg.bad_records != "skip":
                    raise
                report.skipped += 1
                report.note("skipped", where, f"skipped bad record: {e}")
                continue
            taken.extend(got)
        units.extend(taken * src.repeat)
    if not units:
        raise DataError(f"no usable samples in {', '.join(s.path for s in cfg.sources)} ({report.summary()})")
    top = max(int(s.ids.max()) for u in units for s in u)
    if vocab_size is not None and top >= vocab_size:
        raise ConfigError(f"the tokenizer produced token id {top}, but the model's vocab_size is {vocab_size}: "
                          "use the model's own tokenizer (or raise model.overrides.vocab_size)")
    report.samples = len(units)
    report.tokens = sum(len(s.ids) for u in units for s in u)
    report.loss_tokens = sum(int(s.loss[1:].sum()) for u in units for s in u)
    return units, report


def _sft_units(obj: Any, fmt: str, where: str, tokenizer: Any, cfg: SFTDataConfig, report: DataReport
               ) -> list[Unit]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got a JSON {type(obj).__name__}")
    kind = detect_format(obj, where) if fmt == "auto" else fmt
    if kind == "dpo":
        raise DataError(f"{where}: a chosen/rejected (DPO) record in an SFT dataset; set task: dpo")
    if kind == "text":
        text = _need(obj, "text", where, "the text record")
        pieces = text_pieces(tokenizer, text, cfg.seq_len)
        if len(pieces) > 1:
            report.split_texts += 1
        return [(p,) for p in pieces]
    messages, tools = record_to_messages(obj, kind, where, cfg.system)
    ids, loss = tokenize_segments(tokenizer, render_segments(messages, tools, where))
    fitted = fit_sequence(ids, loss, cfg.seq_len, cfg.truncation, where, report)
    return [] if fitted is None else [(Seq(*fitted),)]


# ---- packing ---------------------------------------------------------------------------------------------
def pack_best_fit(lengths: Sequence[int], capacity: int, order: Sequence[int], max_units: int = 0
                  ) -> list[list[int]]:
    """Rows of unit indices: each unit (in `order`) goes into the open row with the least room that still fits
    it (best fit), else a new row. `max_units` > 0 caps the units per row."""
    import bisect

    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free positions, row index) of rows that can take more
    for u in order:
        n = lengths[u]
        if n > capacity:
            raise ValueError(f"unit of {n} positions exceeds the row capacity {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
        else:
            free, r = capacity, len(rows)
            rows.append([])
        rows[r].append(u)
        free -= n
        if free > 0 and (not max_units or len(rows[r]) < max_units):
            bisect.insort(room, (free, r))
    return rows


def build_rows(units: Sequence[Unit], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int, *,
               dpo: bool = False, with_ref: bool = False) -> dict[str, np.ndarray]:
    """Row arrays [R, T]: tokens, targets (IGNORE on padding), positions, segment_ids, loss_mask; for DPO also
    pair_index (unit index within the row, -1 on padding), pair_sign (+1 chosen, -1 rejected) and, with
    precomputed reference log-probs, ref_logp."""
    R, T = len(rows), seq_len
    out = {"tokens": np.full((R, T), pad_id, np.int32), "targets": np.full((R, T), IGNORE, np.int32),
           "positions": np.zeros((R, T), np.int32), "segment_ids": np.zeros((R, T), np.int32),
           "loss_mask": np.zeros((R, T), np.float32)}
    if dpo:
        out["pair_index"] = np.full((R, T), -1, np.int32)
        out["pair_sign"] = np.zeros((R, T), np.float32)
        if with_ref:
            out["ref_logp"] = np.zeros((R, T), np.float32)
    for r, row in enumerate(rows):
        t, seg = 0, 0
        for j, u in enumerate(row):
            for s in units[u]:
                n = s.positions
                seg += 1
                sl = slice(t, t + n)
                out["tokens"][r, sl] = s.ids[:-1]
                out["targets"][r, sl] = s.ids[1:]
                out["positions"][r, sl] = np.arange(n)
                out["segment_ids"][r, sl] = seg
                out["loss_mask"][r, sl] = s.loss[1:]
                if dpo:
                    out["pair_index"][r, sl] = j
                    out["pair_sign"][r, sl] = s.sign
                    if with_ref:
                        if s.ref is None:
                            raise ValueError("reference log-probs requested but not computed for every pair")
                        out["ref_logp"][r, sl] = s.ref
                t += n
    return out


def unit_positions(unit: Unit) -> int:
    return sum(s.positions for s in unit)


class PackedBatches:
    """This process's batches over `units`, epoch after epoch (or one pass with repeat=False).

    Each epoch shuffles the units (seed, epoch), packs them by best fit (or one unit per row), shuffles the
    rows and cuts them into global batches; a repeating iterator drops an epoch's last partial batch (the next
    epoch reshuffles), a single pass pads it with empty rows. The state is (epoch, batch): resuming gives
    exactly the batches that would have come next."""

    def __init__(self, units: Sequence[Unit], seq_len: int, global_batch_size: int, *, pad_id: int, seed: int = 0,
                 shuffle: bool = True, pack: bool = True, repeat: bool = True, process_index: int = 0,
                 process_count: int = 1, dpo: bool = False, max_units_per_row: int = 0) -> None:
        if global_batch_size % process_count:
            raise ConfigError(f"global batch {global_batch_size} does not split over {process_count} processes")
        self.units, self.seq_len, self.global_batch_size = units, seq_len, global_batch_size
        self.pad_id, self.seed, self.shuffle, self.pack, self.repeat = pad_id, seed, shuffle, pack, repeat
        self.process_index, self.process_count = process_index, process_count
        self.dpo, self.max_units = dpo, max_units_per_row
        self.lengths = [unit_positions(u) for u in units]
        too_long = [i for i, n in enumerate(self.lengths) if n > seq_len]
        if too_long:
            raise ConfigError(f"{len(too_long)} samples are longer than seq_len={seq_len} after truncation")
        self.epoch, self.batch = 0, 0
        self._rows: list[list[int]] | None = None
        self._rows_epoch = -1

    def rows_for_epoch(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            n = len(self.units)
            rng = np.random.default_rng([self.seed, 1, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.pack:
                rows = pack_best_fit(self.lengths, self.seq_len, order.tolist(), self.max_units)
            else:
                rows = [[int(u)] for u in order]
            if self.shuffle:
                rows = [rows[i] for i in np.random.default_rng([self.seed, 2, epoch]).permutation(len(rows))]
            self._rows, self._rows_epoch = rows, epoch
        assert self._rows is not None
        return self._rows

    def batches_per_epoch(self, epoch: int = 0) -> int:
        rows = len(self.rows_for_epoch(epoch))
        if self.repeat:
            return max(rows // self.global_batch_size, 1)
        return -(-rows // self.global_batch_size)

    @property
    def with_ref(self) -> bool:
        return self.dpo and all(s.ref is not None for u in self.units for s in u)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_per_epoch(self.epoch):
            if not self.repeat:
                raise StopIteration
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self.rows_for_epoch(self.epoch)
        per = self.global_batch_size // self.process_count
        lo = self.batch * self.global_batch_size + self.process_index * per
        mine = rows[lo: lo + per]
        mine = mine + [[] for _ in range(per - len(mine))]  # a short (single-pass) batch: empty rows
        self.batch += 1
        return build_rows(self.units, mine, self.seq_len, self.pad_id, dpo=self.dpo, with_ref=self.with_ref)

    def fingerprint(self) -> dict[str, Any]:
        return {"units": len(self.units), "positions": int(sum(self.lengths)), "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "pack": self.pack, "shuffle": self.shuffle,
                "process_count": self.process_count}

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "data": self.fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("data") != self.fingerprint() or state.get("seed") != self.seed:
            raise ConfigError("the checkpoint's data position belongs to another dataset or batch layout "
                              f"(saved {state.get('data')}, seed {state.get('seed')}; now {self.fingerprint()}, "
                              f"seed {self.seed}); resume with the same dataset and config")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
