"""A stateful Python interpreter (like an IPython kernel) in a separate, locked-down process.

    with Sandbox() as sb:
        sb.run("import numpy as np; x = np.arange(4)")
        sb.run("x.sum()")                  # ExecResult(stdout='', result='6', error=None, timed_out=False)
        sb.run("open('/etc/passwd').read()").error   # '... PermissionError: sandbox: reading /etc/passwd ...'

Limits per call: wall time (interrupt, then kill), CPU seconds (SIGXCPU -> the cell fails); per session:
address space, a CPU-seconds cap, processes, file size, open files. Isolation levels (`SandboxConfig.isolation`):

- `namespace` (needs root on Linux): private mount/network/IPC/UTS namespaces, a chroot that holds only the
  system libraries and the Python installation (read-only) and the workspace (read-write, noexec), uid
  `nobody`, no_new_privs, plus the audit hook. The kernel enforces the file and network policy.
- `process`: the audit hook, rlimits and, where the kernel allows it, a private network namespace. The audit
  hook refuses the obvious (open, sockets, fork, ctypes, ...) but CPython audit hooks are not a security
  boundary against determined code; use `namespace` (run as root, e.g. in a container) for untrusted code.
- `auto` (default): `namespace` when running as root on Linux, else `process`.

Linux only: the limits are Linux rlimits and the isolation uses Linux namespaces.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Literal, Self

log = logging.getLogger(__name__)

_WORKER = Path(__file__).with_name("_sandbox_worker.py")
_NOBODY = 65534


class SandboxError(RuntimeError):
    """The sandbox process could not be started or talked to."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation. Times in seconds, sizes in MiB."""

    wall_seconds: float = 30.0          # per call: then SIGINT (state kept), then SIGKILL (session lost)
    cpu_seconds: float = 20.0           # per call: SIGXCPU ends the cell
    cpu_seconds_total: int = 600        # per session: the hard RLIMIT_CPU
    memory_mb: int = 2048               # RLIMIT_AS of the interpreter process
    max_processes: int = 32             # RLIMIT_NPROC (enforced when the sandbox does not run as root)
    max_file_mb: int = 64               # RLIMIT_FSIZE
    max_open_files: int = 256           # RLIMIT_NOFILE
    max_output_chars: int = 20_000      # captured stdout/stderr, result repr, traceback: each cut here
    interrupt_grace_seconds: float = 2.0
    startup_seconds: float = 60.0
    isolation: Literal["auto", "namespace", "process"] = "auto"
    preimport: tuple[str, ...] = ("numpy",)
    workspace: str | None = None        # None: a fresh temporary folder, removed on close(); a folder you
    #                                     give is kept, and under namespace isolation chowned to nobody
    audit_hook: bool = True             # False only to test what the kernel enforces on its own

    def __post_init__(self) -> None:
        if self.isolation not in ("auto", "namespace", "process"):
            raise ValueError(f"isolation must be 'auto', 'namespace' or 'process', got {self.isolation!r}")
        for name in ("wall_seconds", "cpu_seconds", "cpu_seconds_total", "memory_mb", "max_processes",
                     "max_file_mb", "max_open_files", "max_output_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.memory_mb < 256:
            raise ValueError(f"SandboxConfig.memory_mb={self.memory_mb} is too small for a Python interpreter; "
                             "use at least 256")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """One cell: captured stdout+stderr, repr of the last expression, the traceback, whether a time limit hit."""

    stdout: str
    result: str | None = None
    error: str | None = None
    timed_out: bool = False
    alive: bool = True                  # False: the process is gone; call restart()

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_text(self) -> str:
        """The cell's output as a notebook shows it: printed text, then the value or the error."""
        parts = [self.stdout.rstrip("\n")] if self.stdout else []
        if self.result is not None:
            parts.append(self.result)
        if self.error is not None:
            parts.append(self.error)
        return "\n".join(parts)


class Sandbox:
    """One interpreter session. Variables persist between `run` calls until `restart()` or `close()`."""

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError(f"the sandbox needs Linux (rlimits, namespaces); this is {sys.platform}")
        self.config = dataclasses.replace(config or SandboxConfig(), **overrides)
        self._lock = threading.Lock()
        self._base = Path(tempfile.mkdtemp(prefix="ij-sandbox-")).resolve()
        self._res = _Resources(self._base)  # what the finalizer releases, should close() never be called
        self._owns_workspace = self.config.workspace is None
        self.workspace = (self._base / "workspace") if self._owns_workspace else \
            Path(self.config.workspace).resolve()  # type: ignore[arg-type]
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.isolation: str = ""
        self.info: dict[str, Any] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, self._res.release)

    # ---- life cycle ----

    def start(self) -> Sandbox:
        """Start the interpreter process (done by the first `run` if not called)."""
        with self._lock:
            if self._proc is None:
                self._start()
        return self

    def restart(self) -> Sandbox:
        """A fresh interpreter (all variables gone); the workspace files stay."""
        with self._lock:
            self._stop()
            self._start()
        return self

    def close(self) -> None:
        """Stop the process and remove the temporary folders (a workspace you passed in is kept)."""
        with self._lock:
            self._stop()
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not _exited(self._proc, 0.0)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- running code ----

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        """Run one cell. Never raises for the code's own failures: see `ExecResult.error`."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        with self._lock:
            if self._proc is None:
                self._start()
            if not self.alive:
                return ExecResult("", error="the sandbox session is not running (it crashed or was killed); "
                                  "call restart() for a fresh one", alive=False)
            return self._run(code, self.config.wall_seconds if timeout is None else timeout)

    def _run(self, code: str, wall: float) -> ExecResult:
        assert self._proc is not None
        try:
            _send(self._req_w, {"code": code})
        except (BrokenPipeError, OSError):
            return self._died()
        reply = self._wait(wall)
        if reply == "eof":
            return self._died()
        if reply is not None:
            return self._result(reply, timed_out=reply.get("error_type") == "CpuTimeExceeded")
        try:
            os.kill(self._proc.pid, signal.SIGINT)  # like Ctrl-C in a notebook: the state survives
        except ProcessLookupError:
            return self._died()
        reply = self._wait(self.config.interrupt_grace_seconds)
        if reply == "eof":
            return self._died()
        if reply is not None:
            if reply.get("error_type") != "KeyboardInterrupt":  # it finished just as the time ran out
                return self._result(reply, timed_out=reply.get("error_type") == "CpuTimeExceeded")
            note = f"TimeoutError: the cell ran longer than the wall-time limit of {wall:g}s and was interrupted"
            return dataclasses.replace(self._result(reply, timed_out=True), error=f"{note}\n{reply['error']}")
        self._kill()
        return ExecResult("", error=f"TimeoutError: the cell ran longer than the wall-time limit of {wall:g}s, "
                          "ignored the interrupt and was killed; the session state is lost, call restart()",
                          timed_out=True, alive=False)

    def _result(self, reply: dict[str, Any], timed_out: bool) -> ExecResult:
        error = reply.get("error")
        if reply.get("error_type") == "CpuTimeExceeded":
            error = f"{error}\n(limit: {self.config.cpu_seconds:g} CPU seconds per call)"
        return ExecResult(reply.get("stdout", ""), reply.get("result"), error, timed_out, True)

    def _wait(self, seconds: float) -> dict[str, Any] | Literal["eof"] | None:
        ready, _, _ = select.select([self._resp_r], [], [], max(seconds, 0.0))
        if not ready:
            return None
        try:
            return _recv(self._resp_r)
        except EOFError:
            return "eof"

    def _died(self) -> ExecResult:
        assert self._proc is not None
        _exited(self._proc, 5.0)
        self._kill()
        code = self._proc.returncode
        why = f"exit code {code}" if code is None or code >= 0 else f"signal {signal.Signals(-code).name}"
        hint = ""
        if code in (-signal.SIGKILL, -signal.SIGXCPU):
            hint = (f" (CPU limits: {self.config.cpu_seconds:g}s per call, {self.config.cpu_seconds_total}s per "
                    "session; or out of memory)")
        return ExecResult("", error=f"the sandbox process died ({why}){hint}; the session state is lost, "
                          "call restart()", alive=False)

    # ---- process management ----

    def _start(self) -> None:
        if self._closed:
            raise SandboxError("this sandbox was closed; make a new Sandbox")
        isolation = self.config.isolation
        if isolation == "auto":
            isolation = "namespace" if os.geteuid() == 0 else "process"
        try:
            self._spawn(isolation)
        except SandboxError as e:
            if self.config.isolation != "auto" or isolation == "process":
                raise
            log.warning("namespace isolation failed, falling back to process isolation: %s", e)
            self._spawn("process")

    def _spawn(self, isolation: str) -> None:
        ws = str(self.workspace)
        root_dir = self._base / "root"
        root_dir.mkdir(exist_ok=True)
        if isolation == "namespace":
            if os.geteuid() != 0:
                raise SandboxError("namespace isolation needs root (it mounts a private file-system view); "
                                   "run as root (e.g. in a container) or use isolation='process'")
            for dirpath, _, files in os.walk(ws):
                os.chown(dirpath, _NOBODY, _NOBODY)
                for name in files:
                    os.chown(os.path.join(dirpath, name), _NOBODY, _NOBODY, follow_symlinks=False)
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        cfg = {**dataclasses.asdict(self.config), "isolation": isolation, "workspace": ws,
               "root_dir": str(root_dir), "request_fd": req_r, "response_fd": resp_w,
               "read_roots": _read_roots(), "ro_paths": _ro_paths(), "preimport": list(self.config.preimport)}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": ws, "TMPDIR": ws, "LANG": "C.UTF-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NUMEXPR_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": ws}
        log_path = self._base / "worker.log"
        with open(log_path, "ab") as stderr:
            proc = subprocess.Popen([sys.executable, "-I", "-B", str(_WORKER), json.dumps(cfg)],
                                    pass_fds=(req_r, resp_w), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=ws,
                                    start_new_session=True)
        os.close(req_r)
        os.close(resp_w)
        self._res.proc, self._res.req_w, self._res.resp_r = proc, req_w, resp_r
        ready = self._wait(self.config.startup_seconds)
        if not isinstance(ready, dict) or not ready.get("ready"):
            detail = ready.get("error") if isinstance(ready, dict) else \
                "no answer" if ready is None else "it exited"
            self._stop()
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise SandboxError(f"the sandbox ({isolation} isolation) did not start: {detail}"
                               + (f"\nworker log:\n{tail}" if tail.strip() else ""))
        self.isolation, self.info = isolation, ready

    # the live process and its pipes, kept in the finalizer's holder
    _proc = property(lambda self: self._res.proc)
    _req_w = property(lambda self: self._res.req_w)
    _resp_r = property(lambda self: self._res.resp_r)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            _kill_group(self._proc)

    def _stop(self) -> None:
        self._res.stop()


class _Resources:
    """The worker process, its pipes and the temporary folder: released by close() or, failing that, when
    the Sandbox is garbage-collected or the interpreter exits."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        self.req_w = self.resp_r = -1

    def stop(self) -> None:
        if self.proc is None:
            return
        for fd in (self.req_w, self.resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.req_w = self.resp_r = -1
        _exited(self.proc, 1.0)  # EOF on its request pipe ends the worker's loop
        if self.proc.returncode is None:
            _kill_group(self.proc)  # and anything it forked, should a cell have managed to
        self.proc = None

    def release(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def _exited(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Wait up to `seconds` for the process to exit, without reaping it (its pid stays its group's id)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and anything it forked (its own session), then reap the worker. Called only while
    the worker is not yet reaped, so the process-group id cannot belong to anyone else."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ---- what the sandbox may see ------------------------------------------------------------------------------

def _python_dirs() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})


def _read_roots() -> list[str]:
    """Readable inside the sandbox besides the workspace: the Python installation and a few devices."""
    extra = ["/usr/share/zoneinfo", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"]
    return _outermost(_python_dirs() + [p for p in extra if os.path.exists(p)])


def _ro_paths() -> list[str]:
    """Bind-mounted read-only into the namespace sandbox's root: system libraries + the Python installation."""
    system = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
              "/etc/localtime"]
    links = [p for p in system if os.path.islink(p)]
    return links + _outermost([p for p in system if os.path.exists(p) and p not in links] + _python_dirs())


def _outermost(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


# ---- protocol (the worker has its own copy: it imports nothing from this package) -------------------------

def _send(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode("utf-8", "surrogatepass")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd: int) -> dict[str, Any]:
    def exact(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, n)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    size = int.from_bytes(exact(8), "big")
    return json.loads(exact(size).decode("utf-8", "surrogatepass"))
