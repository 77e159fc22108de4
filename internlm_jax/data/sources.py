"""Random-access text sources: jsonl, parquet and array_record files, each yielding one document string per index.

Every source has `__len__`, `__getitem__(i) -> str` (grain's RandomAccessDataSource protocol) and
`where(i) -> str` ("file.jsonl line 7"). A record that cannot give text raises `DataError` naming the
file and line/row/record. Sources are picklable (open handles are re-opened lazily after unpickling), so
grain worker processes can read them, and thread-safe (positioned reads, a lock around parquet's cache).
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import os
import threading
from typing import Any, Protocol

import numpy as np

from internlm_jax.data.config import SourceConfig

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".array_record": "array_record",
               ".arrayrecord": "array_record"}


class DataError(ValueError):
    """Bad input data: the message names the file and line (or row/record) and what was wrong."""


class TextSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...

    def where(self, index: int) -> str: ...


def _text_from_object(obj: Any, field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got a JSON "
                        f"{type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(repr(k) for k in sorted(obj)) or "none"
        raise DataError(f"{where}: no field {field!r} (available keys: {keys}); set text_field in the source "
                        "config to the field that holds the text")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is not a string (got {type(text).__name__})")
    return text


# ---------------------------------------------------------------------------------------------- jsonl

def _index_lines(path: str, chunk_bytes: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start offset, byte length, 1-based line number) of every non-blank line; one streaming pass."""
    starts, lengths, numbers = [], [], []
    offset, line_no, line_start = 0, 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                break
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A) + offset
            ends = newlines
            s = np.concatenate([[line_start], newlines[:-1] + 1]) if len(newlines) else np.zeros(0, np.int64)
            starts.append(s)
            lengths.append(ends - s)
            numbers.append(np.arange(line_no + 1, line_no + 1 + len(newlines)))
            line_no += len(newlines)
            if len(newlines):
                line_start = int(newlines[-1]) + 1
            offset += len(chunk)
    if line_start < offset:  # last line without a trailing newline
        starts.append(np.array([line_start]))
        lengths.append(np.array([offset - line_start]))
        numbers.append(np.array([line_no + 1]))
    start = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
    length = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
    number = np.concatenate(numbers).astype(np.int64) if numbers else np.zeros(0, np.int64)
    # Blank lines (empty, "\r", or whitespace only) are not records. Only short lines can be whitespace-only
    # cheaply enough to check one by one; longer whitespace-only lines fail later as invalid JSON.
    keep = length > 0
    short = np.flatnonzero((length > 0) & (length <= 16))
    if len(short):
        with open(path, "rb") as f:
            for i in short:
                f.seek(int(start[i]))
                if not f.read(int(length[i])).strip():
                    keep[i] = False
    return start[keep], length[keep], number[keep]


class JsonlSource:
    """One JSON object per line; blank lines are ignored; line numbers in errors are 1-based file lines."""

    def __init__(self, path: str, text_field: str = "text"):
        self.path, self.text_field = path, text_field
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty (0 bytes); a jsonl source needs one JSON object per line")
        self._start, self._length, self._line = _index_lines(path)
        if len(self._start) == 0:
            raise DataError(f"{path} has no records (only blank lines); a jsonl source needs one JSON object "
                            "per line")
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._start)

    def where(self, index: int) -> str:
        return f"{self.path} line {int(self._line[index])}"

    def __getitem__(self, index: int) -> str:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, int(self._length[index]), int(self._start[index]))
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.where(index)}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where(index)}: not valid JSON ({e.msg} at column {e.colno}); each line "
                            "of a jsonl file must be one JSON object") from None
        return _text_from_object(obj, self.text_field, self.where(index))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


# -------------------------------------------------------------------------------------------- parquet

class ParquetSource:
    """Rows of a parquet file; the text column is read one row group at a time (a few cached).

    Global shuffling over a file with many row groups re-reads row groups often; for big corpora prefer
    array_record, which is built for random access.
    """

    def __init__(self, path: str, text_field: str = "text", cached_row_groups: int = 4):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.text_field, self._cache_size = path, text_field, cached_row_groups
        try:
            meta = pq.ParquetFile(path).metadata
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path} is not a readable parquet file: {e}") from None
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r} (available columns: "
                            f"{', '.join(repr(n) for n in schema.names)}); set text_field in the source config")
        col_type = schema.field(text_field).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise DataError(f"{path}: column {text_field!r} has type {col_type}, expected a string column")
        if meta.num_rows == 0:
            raise DataError(f"{path} is empty (0 rows)")
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._file = None
        self._cache: collections.OrderedDict[int, list[str | None]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def where(self, index: int) -> str:
        return f"{self.path} row {index}"

    def _row_group(self, g: int) -> list[str | None]:
        import pyarrow.parquet as pq

        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
            if self._file is None:
                self._file = pq.ParquetFile(self.path)
            values = self._file.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
            self._cache[g] = values
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return values

    def __getitem__(self, index: int) -> str:
        g = bisect.bisect_right(self._offsets, index) - 1
        text = self._row_group(g)[index - int(self._offsets[g])]
        if text is None:
            raise DataError(f"{self.where(index)}: column {self.text_field!r} is null")
        return text

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_cache", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()


# --------------------------------------------------------------------------------------- array_record

class ArrayRecordSource:
    """Records of an array_record file: JSON objects (text in `text_field`) or raw UTF-8 text.

    Which of the two is decided once per file from its first record: if that record parses as a JSON
    object the file is a JSON file and every record must be one; otherwise every record is raw text.
    """

    def __init__(self, path: str, text_field: str = "text"):
        import grain

        self.path, self.text_field = path, text_field
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty (0 bytes)")
        try:
            self._source = grain.sources.ArrayRecordDataSource([path])
        except RuntimeError as e:
            raise DataError(f"{path} is not a readable array_record file: {e}") from None
        if len(self._source) == 0:
            raise DataError(f"{path} is empty (0 records)")
        self.json_records = self._looks_like_json(self._source[0])

    @staticmethod
    def _looks_like_json(raw: bytes) -> bool:
        if not raw.lstrip().startswith(b"{"):
            return False
        try:
            return isinstance(json.loads(raw), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False

    def __len__(self) -> int:
        return len(self._source)

    def where(self, index: int) -> str:
        return f"{self.path} record {index}"

    def __getitem__(self, index: int) -> str:
        raw = self._source[index]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.where(index)}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not self.json_records:
            return text
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where(index)}: not valid JSON ({e.msg} at column {e.colno}); this file's "
                            "first record is a JSON object, so every record must be one") from None
        return _text_from_object(obj, self.text_field, self.where(index))


class TokenShardSource:
    """Records of a prepared array_record shard (`internlm-jax data prepare`): each is one document's token ids,
    little-endian int32. `__getitem__` gives an int32 array, which the tokenize step passes through."""

    def __init__(self, path: str, text_field: str = "text"):
        import grain

        self.path = path
        try:
            self._source = grain.sources.ArrayRecordDataSource([path])
        except RuntimeError as e:
            raise DataError(f"{path} is not a readable array_record file: {e}") from None
        if len(self._source) == 0:
            raise DataError(f"{path} is empty (0 records)")

    def __len__(self) -> int:
        return len(self._source)

    def where(self, index: int) -> str:
        return f"{self.path} record {index}"

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        raw = self._source[index]
        if len(raw) % 4:
            raise DataError(f"{self.where(index)}: {len(raw)} bytes is not a whole number of int32 token ids; "
                            "format 'tokens' reads shards written by `internlm-jax data prepare`")
        return np.frombuffer(raw, dtype="<i4").astype(np.int32)


# ------------------------------------------------------------------------------------ files, formats

class ConcatSource:
    """Several sources read as one, in order."""

    def __init__(self, parts: list[TextSource]):
        self.parts = parts
        self._offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[TextSource, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a source of {len(self)} records")
        p = bisect.bisect_right(self._offsets, index) - 1
        return self.parts[p], index - int(self._offsets[p])

    def __getitem__(self, index: int) -> str:
        part, i = self._locate(index)
        return part[i]

    def where(self, index: int) -> str:
        part, i = self._locate(index)
        return part.where(i)


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise DataError(f"cannot tell the format of {path!r} from its extension {ext or '(none)'!r}; set format "
                        "to one of jsonl, parquet, array_record")
    return _EXTENSIONS[ext]


def resolve_files(config: SourceConfig) -> list[tuple[str, str]]:
    """[(file, format)] for a source path that is a file, a directory or a glob pattern."""
    path = os.path.expanduser(config.path)
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise DataError(f"data source pattern {config.path!r} matched no files")
    elif os.path.isdir(path):
        names = sorted(os.listdir(path))
        if config.format == "tokens":
            files = [os.path.join(path, n) for n in names if n.endswith(".array_record")]
        elif config.format == "auto":
            files = [os.path.join(path, n) for n in names if os.path.splitext(n)[1].lower() in _EXTENSIONS]
        else:
            exts = [e for e, fmt in _EXTENSIONS.items() if fmt == config.format]
            files = [os.path.join(path, n) for n in names if os.path.splitext(n)[1].lower() in exts]
        if not files:
            raise DataError(f"data source directory {config.path!r} holds no data files with a known extension "
                            f"({', '.join(sorted(_EXTENSIONS))}); it contains {names[:10] or 'nothing'}")
    elif os.path.exists(path):
        files = [path]
    else:
        raise DataError(f"data source path {config.path!r} does not exist (resolved to {os.path.abspath(path)})")
    return [(f, _format_of(f, config.format)) for f in files]


_READERS = {"jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource,
            "tokens": TokenShardSource}


def open_source(config: SourceConfig) -> TextSource:
    """Open every file of one configured source; errors name the file."""
    parts = [_READERS[fmt](f, config.text_field) for f, fmt in resolve_files(config)]
    return parts[0] if len(parts) == 1 else ConcatSource(parts)
