"""Shards: which shard a document goes to, and writing one shard as an array_record file.

A shard is written by one worker after a GroupByKey on (source, shard index); its records are sorted by the
documents' stable keys first, so the bytes of every shard are the same on every run and every runner. A
shard goes to a temporary name and is renamed when complete; outside the local filesystem (gs://, s3://,
hdfs://) it is written locally and copied through Beam's FileSystems.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable

SHARD_SUFFIX = ".array_record"


def shard_of(key: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") % num_shards


def shard_name(source: str, index: int, num_shards: int) -> str:
    return f"{source}/{source}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def is_local(path: str) -> bool:
    return "://" not in path


def join(base: str, rel: str) -> str:
    if is_local(base):
        return os.path.join(base, rel)
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(base, rel)


def write_shard(path: str, records: Iterable[bytes]) -> tuple[int, str]:
    """Write records in the given order; returns (bytes on disk, sha256 of the file)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    local = is_local(path)
    if local:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=SHARD_SUFFIX)
    else:
        fd, tmp = tempfile.mkstemp(suffix=SHARD_SUFFIX)
    os.close(fd)
    try:
        # group_size:1 makes every record its own chunk: fast random access for grain's global shuffle.
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for rec in records:
            writer.write(rec)
        writer.close()
        digest, size = hashlib.sha256(), 0
        out = None
        if not local:
            from apache_beam.io.filesystems import FileSystems

            out = FileSystems.create(path)
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
        if out is not None:
            out.close()
        else:
            os.replace(tmp, path)
        return size, digest.hexdigest()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
