"""Run model-written programs (HumanEval checks) in separate processes with time and memory limits and no
network.

Backends:
- "sandbox": `internlm_jax.agent.sandbox.Sandbox` (the agent's locked-down interpreter), one fresh sandbox
  per program.
- "subprocess": a minimal runner of our own: `python -I -B` in an empty temporary folder with a scrubbed
  environment, its own session (the whole process group is killed on timeout), rlimits set by a small
  wrapper before the program runs (address space, CPU seconds, file size, no core dumps, open files), a
  private network namespace when the kernel allows unprivileged user namespaces, and in any case
  `socket.socket` replaced by a function that raises. The wrapper is a guard against accidents, not a
  security boundary against hostile code; use the sandbox backend (as root) for that.
- "auto": the sandbox when it can be imported, else the subprocess runner.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Literal

Backend = Literal["auto", "sandbox", "subprocess"]

_WRAPPER = r"""
import ctypes, resource, runpy, sys
mem, cpu, fsize = (int(x) for x in sys.argv[1:4])
path = sys.argv[4]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
try:  # CLONE_NEWUSER | CLONE_NEWNET: no interface but a down loopback
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(0x10000000 | 0x40000000)
except Exception:
    pass
import socket
def _no_network(*a, **k):
    raise OSError("network access is disabled while evaluating code")
socket.socket = _no_network
socket.create_connection = _no_network
del ctypes, libc
sys.argv = [path]
runpy.run_path(path, run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class ExecOutcome:
    passed: bool
    status: str  # "passed", "failed", "timed out", or "error: ..."
    detail: str = ""  # tail of stderr / the error text


def _tail(text: str, n: int = 400) -> str:
    text = text.strip()
    return text[-n:]


def run_subprocess(code: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> ExecOutcome:
    with tempfile.TemporaryDirectory(prefix="ij_eval_exec_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        cmd = [sys.executable, "-I", "-B", "-c", _WRAPPER, str(memory_mb << 20), str(int(timeout) + 1),
               str(64 << 20), path]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecOutcome(False, "timed out", f"no result within {timeout} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err_text = err.decode("utf-8", "replace")
        if proc.returncode == 0:
            return ExecOutcome(True, "passed")
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return ExecOutcome(False, "timed out", f"killed by signal {-proc.returncode} (CPU limit)")
        return ExecOutcome(False, "failed", _tail(err_text))


def _sandbox_available() -> bool:
    try:
        from internlm_jax.agent.sandbox import Sandbox  # noqa: F401
    except ImportError:
        return False
    return True


def run_sandbox(code: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> ExecOutcome:
    from internlm_jax.agent.sandbox import Sandbox, SandboxConfig

    cfg = SandboxConfig(wall_seconds=timeout, cpu_seconds=timeout, memory_mb=max(memory_mb, 256), preimport=())
    with Sandbox(cfg) as sb:
        r = sb.run(code)
    if r.timed_out:
        return ExecOutcome(False, "timed out", f"no result within {timeout} s")
    if r.error:
        return ExecOutcome(False, "failed", _tail(str(r.error)))
    return ExecOutcome(True, "passed")


def run_programs(programs: Sequence[str], *, backend: Backend = "auto", timeout: float = 10.0,
                 memory_mb: int = 1024, workers: int | None = None) -> list[ExecOutcome]:
    """Run each program in its own process (several at once); order of results = order of programs."""
    if backend == "auto":
        backend = "sandbox" if _sandbox_available() else "subprocess"
    if backend not in ("sandbox", "subprocess"):
        raise ValueError(f"code execution backend must be auto|sandbox|subprocess, got {backend!r}")
    fn = run_sandbox if backend == "sandbox" else run_subprocess
    workers = workers or max(1, min(8, os.cpu_count() or 1))

    def one(code: str) -> ExecOutcome:
        try:
            return fn(code, timeout=timeout, memory_mb=memory_mb)
        except Exception as e:  # noqa: BLE001 - a runner failure is a failed sample, never a crashed run
            return ExecOutcome(False, f"error: {type(e).__name__}", _tail(str(e)))

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, programs))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: the prompt, the completion, the test, then check(entry_point)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
