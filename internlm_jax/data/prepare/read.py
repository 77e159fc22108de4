"""Input files of the raw sources: glob expansion on the driver, and reading one file inside a worker.

Files are found and read through Beam's FileSystems, so a path may be local or gs:// / s3:// / hdfs:// (with
the matching Beam extra installed). Each document gets a stable key `source|file|index` (the index is the
line number in a jsonl file, the row number in a parquet file, zero-padded so that keys sort in file order).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator

from internlm_jax.config import ConfigError
from internlm_jax.data.prepare.config import SourceSpec
from internlm_jax.data.sources import DataError

_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}

Doc = tuple[str, str, str]  # (stable key, source name, text)


def doc_key(source: str, path: str, index: int) -> str:
    return f"{source}|{path}|{index:012d}"


def source_of(key: str) -> str:
    return key.split("|", 1)[0]


def expand_source(spec: SourceSpec) -> list[tuple[str, str]]:
    """[(file, format)] of one source, sorted; a clear error when nothing matches."""
    from apache_beam.io.filesystems import FileSystems

    path = os.path.expanduser(spec.path)
    if "://" not in path and os.path.isdir(path):
        pattern = os.path.join(path, "*")
    else:
        pattern = path
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # noqa: BLE001  (BeamIOError for missing dirs, ValueError for unknown schemes)
        raise ConfigError(f"source {spec.name!r}: cannot list {spec.path!r}: {e}") from None
    files = sorted(m.path for m in found)
    if spec.format == "auto":
        out = [(f, _FORMATS[os.path.splitext(f)[1].lower()]) for f in files
               if os.path.splitext(f)[1].lower() in _FORMATS]
    else:
        out = [(f, spec.format) for f in files]
    if not out:
        raise ConfigError(f"source {spec.name!r}: {spec.path!r} matched no jsonl or parquet files"
                          + (f" (found {', '.join(os.path.basename(f) for f in files[:5])})" if files else ""))
    return out


def read_file(source: str, path: str, fmt: str, text_field: str, skip_bad: bool) -> Iterator[Doc | DataError]:
    """Every document of one file; a bad record raises DataError, or with skip_bad is yielded as the error."""
    from apache_beam.io.filesystems import FileSystems

    if fmt == "jsonl":
        with FileSystems.open(path) as raw:
            for line_no, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="strict"), start=1):
                if not line.strip():
                    continue
                where = f"{path} line {line_no}"
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise DataError(f"{where}: expected a JSON object with a string field {text_field!r}"
                                        + (f" (keys: {', '.join(sorted(obj))})" if isinstance(obj, dict) else ""))
                except json.JSONDecodeError as e:
                    err = DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                    if not skip_bad:
                        raise err from None
                    yield err
                    continue
                except DataError as err:
                    if not skip_bad:
                        raise
                    yield err
                    continue
                yield doc_key(source, path, line_no), source, obj[text_field]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(path) as raw:
            pf = pq.ParquetFile(raw)
            if text_field not in pf.schema_arrow.names:
                raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
            row = 0
            for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
                for text in batch.column(0).to_pylist():
                    if not isinstance(text, str):
                        err = DataError(f"{path} row {row}: column {text_field!r} is "
                                        f"{'null' if text is None else type(text).__name__}, not a string")
                        if not skip_bad:
                            raise err
                        yield err
                    else:
                        yield doc_key(source, path, row), source, text
                    row += 1
    else:
        raise DataError(f"{path}: unsupported format {fmt!r} (jsonl or parquet)")
