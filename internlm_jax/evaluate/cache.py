"""Per-(model, task) prediction cache: one JSONL file of records, appended and flushed batch by batch, so an
interrupted run resumes with only the missing items.

Layout: {work_dir}/predictions/{model}/{task}.jsonl, beside it {task}.meta.json holding the task version.
A cache written for another version of the task (changed prompt, data or settings) is moved aside to
{task}.jsonl.stale and the task starts over. A torn last line (a kill mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class PredictionCache:
    def __init__(self, work_dir: str, model: str, task: str, version: str):
        self.dir = os.path.join(work_dir, "predictions", _safe(model))
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"{_safe(task)}.jsonl")
        self.meta_path = os.path.join(self.dir, f"{_safe(task)}.meta.json")
        self.version = version
        self.stale = False
        if os.path.exists(self.path):
            old = None
            if os.path.exists(self.meta_path):
                with open(self.meta_path) as f:
                    old = json.load(f).get("version")
            if old != version:
                os.replace(self.path, self.path + ".stale")
                self.stale = True
        with open(self.meta_path, "w") as f:
            json.dump({"model": model, "task": task, "version": version}, f)

    def load(self) -> dict[int, dict[str, Any]]:
        done: dict[int, dict[str, Any]] = {}
        if not os.path.exists(self.path):
            return done
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn write from an interrupted run: that item is recomputed
                done[int(rec["idx"])] = rec
        return done

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._ensure_newline()
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    def _ensure_newline(self) -> None:
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
