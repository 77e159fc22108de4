"""Per-session cgroups (pids, memory, CPU) for the sandbox, where the machine lets the host create them (root,
cgroup v1 controllers or a cgroup v2 tree with them enabled). Where it does not, `SessionCgroup.create`
returns None and the per-session rlimits (in their own user namespace and uid) are the limits."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")


def _own_path(controller: str) -> str:
    """This process's cgroup path for a v1 controller ('' for v2's unified line)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    raise OSError(f"no {controller or 'v2'} line in /proc/self/cgroup")


class SessionCgroup:
    """One folder per controller (v1) or one folder (v2), made under this process's own cgroup."""

    def __init__(self, dirs: list[Path], summary: str) -> None:
        self.dirs, self.summary = dirs, summary

    @classmethod
    def create(cls, name: str, *, pids: int, memory_bytes: int, cpus: float) -> SessionCgroup | None:
        if os.geteuid() != 0:
            return None
        period = 100_000
        quota = max(1000, int(cpus * period))
        v1 = {"pids": {"pids.max": str(pids)},
              "memory": {"memory.limit_in_bytes": str(memory_bytes)},
              "cpu": {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(quota)}}
        v2 = {"pids.max": str(pids), "memory.max": str(memory_bytes), "memory.swap.max": "0",
              "cpu.max": f"{quota} {period}"}
        made: list[Path] = []
        try:
            if (ROOT / "cgroup.controllers").exists():  # pure v2
                base = ROOT / _own_path("").lstrip("/")
                wanted = {"pids", "memory", "cpu"}
                if not wanted <= set((base / "cgroup.subtree_control").read_text().split()):
                    raise OSError(f"{base} does not delegate pids, memory and cpu to its children")
                made.append(_mkdir(base / name))
                for key, value in v2.items():
                    _write(made[0] / key, value, optional=key == "memory.swap.max")
            else:
                for controller, settings in v1.items():
                    base = ROOT / controller / _own_path(controller).lstrip("/")
                    made.append(_mkdir(base / name))
                    for key, value in settings.items():
                        _write(made[-1] / key, value)
        except OSError as e:
            log.info("sandbox: no per-session cgroup (%s); the per-session rlimits apply", e)
            cls(made, "").remove()
            return None
        return cls(made, f"cgroup pids.max={pids} memory={memory_bytes >> 20}MiB cpus={cpus:g}")

    def attach(self, pids: list[int]) -> None:
        """Move the session's processes in (all of them: the worker has run nothing yet when this is called)."""
        for d in self.dirs:
            for pid in pids:
                (d / "cgroup.procs").write_text(str(pid))

    def remove(self, wait: float = 2.0) -> None:
        """Remove the folders once their processes are gone (they are being killed when this runs)."""
        deadline = time.monotonic() + wait
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if time.monotonic() >= deadline:
                        log.warning("sandbox: could not remove cgroup %s: %s", d, e)
                        break
                    time.sleep(0.02)
        self.dirs = []


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise
