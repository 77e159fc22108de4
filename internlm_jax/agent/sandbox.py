"""A stateful Python interpreter (like an IPython kernel) in a separate, locked-down process.

    with Sandbox() as sb:
        sb.run("import numpy as np; x = np.arange(4)")
        sb.run("x.sum()")                  # ExecResult(stdout='', result='6', error=None, timed_out=False)
        sb.run("open('/etc/passwd').read()").error   # '... PermissionError: sandbox: reading /etc/passwd ...'

Limits per call: wall time (interrupt, then kill), CPU seconds (SIGXCPU -> the cell fails); per session:
address space, a CPU-seconds cap, processes/threads, file size, the workspace's total size, open files.
Isolation levels (`SandboxConfig.isolation`):

- `namespace` (the default; `auto` is the same): bubblewrap (Debian's `bubblewrap` package) runs the worker in
  its own user, PID, mount, network, IPC, UTS and cgroup namespaces, as a host uid leased to this session
  alone (when the host runs as root), with a seccomp filter that denies signalling or inspecting other
  processes and making namespaces, no host fds but its own pipes, a read-only root holding only the system
  libraries and the Python installation, and the workspace: a size-capped tmpfs (root) that survives
  restart(). Per-session cgroups cap its processes, memory and CPU where the host may create them, rlimits in
  its own user namespace otherwise. The PID namespace dies with the session: close() leaves no process.
  Without bwrap the sandbox refuses to start.
- `unsafe-process`: the audit hook and rlimits only, no kernel isolation; for trusted code only. CPython audit
  hooks are not a security boundary against determined code.

The host treats the worker as hostile: replies are bounded in size and time and must answer the call they
claim to answer; anything else ends the session (`ExecResult.alive` is False: call restart()). Linux only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Literal, Self

from internlm_jax.agent import _isolation as iso
from internlm_jax.agent._cgroup import SessionCgroup
from internlm_jax.agent._channel import Channel, PeerClosed, ProtocolError, check_reply
from internlm_jax.agent._seccomp import build_filter

log = logging.getLogger(__name__)

_WORKER = Path(__file__).with_name("_sandbox_worker.py")
_NO_BWRAP = ("the sandbox needs bubblewrap (`bwrap`) for its isolation and it is not installed: install it "
             "(Debian/Ubuntu: apt-get install bubblewrap), or pass isolation='unsafe-process' to run code with "
             "no kernel isolation at all (trusted code only)")


class SandboxError(RuntimeError):
    """The sandbox process could not be started or talked to."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation. Times in seconds, sizes in MiB."""

    wall_seconds: float = 30.0          # per call: then SIGINT (state kept), then SIGKILL (session lost)
    cpu_seconds: float = 20.0           # per call: SIGXCPU ends the cell
    cpu_seconds_total: int = 600        # per session: the hard RLIMIT_CPU
    memory_mb: int = 2048               # RLIMIT_AS of the interpreter process (the session's cgroup: + workspace)
    max_processes: int = 32             # processes + threads of the session (its own uid / user namespace)
    max_file_mb: int = 64               # RLIMIT_FSIZE
    workspace_mb: int = 256             # the temporary workspace's total size (a tmpfs; needs root)
    cpus: float = 1.0                   # the session's CPU share, where a cgroup can be made
    max_open_files: int = 256           # RLIMIT_NOFILE
    max_output_chars: int = 20_000      # captured stdout/stderr, result repr, traceback: each cut here
    interrupt_grace_seconds: float = 2.0
    startup_seconds: float = 60.0
    isolation: Literal["auto", "namespace", "unsafe-process"] = "auto"
    preimport: tuple[str, ...] = ("numpy",)
    workspace: str | None = None        # None: a fresh size-capped temporary folder, removed on close(); a
    #                                     folder you give is kept (not size-capped), under namespace isolation
    #                                     as root given to the session's uid (links in it are not followed)
    audit_hook: bool = True             # False only to test what the kernel enforces on its own

    def __post_init__(self) -> None:
        if self.isolation == "process":
            raise ValueError("isolation='process' is now called 'unsafe-process' (no kernel isolation, trusted "
                             "code only); the default, 'namespace', needs bubblewrap")
        if self.isolation not in ("auto", "namespace", "unsafe-process"):
            raise ValueError(f"isolation must be 'auto', 'namespace' or 'unsafe-process', got {self.isolation!r}")
        for name in ("wall_seconds", "cpu_seconds", "cpu_seconds_total", "memory_mb", "max_processes",
                     "max_file_mb", "workspace_mb", "cpus", "max_open_files", "max_output_chars"):
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


def available() -> bool:
    """Whether the default (namespace) isolation can run here: Linux and bubblewrap installed."""
    return sys.platform.startswith("linux") and iso.find_bwrap() is not None


class Sandbox:
    """One interpreter session. Variables persist between `run` calls until `restart()` or `close()`."""

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError(f"the sandbox needs Linux (namespaces, seccomp, rlimits); this is {sys.platform}")
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
            if self._res.proc is None:
                self._start()
        return self

    def restart(self) -> Sandbox:
        """A fresh interpreter (all variables gone); the workspace files stay."""
        with self._lock:
            self._res.stop()
            self._start()
        return self

    def close(self) -> None:
        """Stop the process and remove the temporary folders (a workspace you passed in is kept)."""
        with self._lock:
            self._res.stop()
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        proc = self._res.proc
        return proc is not None and proc.returncode is None and not _exited(proc, 0.0)

    @property
    def pid(self) -> int | None:
        """The host pid of the process that runs the cells."""
        return self._res.worker_pid if self._res.proc is not None else None

    # ---- running code ----

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        """Run one cell. Never raises or hangs for anything the code does: see `ExecResult.error`."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        with self._lock:
            if self._res.proc is None:
                self._start()
            if not self.alive or self._res.channel is None:
                return ExecResult("", error="the sandbox session is not running (it crashed or was killed); "
                                  "call restart() for a fresh one", alive=False)
            wall = self.config.wall_seconds if timeout is None else timeout
            start = time.monotonic()
            try:
                return self._run(code, wall, start)
            except (PeerClosed, OSError):
                return self._died()
            except ProtocolError as e:
                self._res.kill()
                late = time.monotonic() - start >= wall
                return ExecResult("", error=f"the sandbox session broke the protocol with the host: {e}; it was "
                                  "stopped, the session state is lost, call restart()", timed_out=late, alive=False)

    def _run(self, code: str, wall: float, start: float) -> ExecResult:
        chan = self._res.channel
        assert chan is not None
        if chan.pending():
            raise ProtocolError("the worker sent a reply nobody asked for")
        nonce = secrets.token_hex(16)
        chan.send({"code": code, "nonce": nonce}, start + max(wall, 1.0))
        reply = chan.receive(start + wall)
        if reply is not None:
            return self._result(check_reply(reply, nonce, self.config.max_output_chars))
        if not self._res.signal_worker(signal.SIGINT):  # like Ctrl-C in a notebook: the state survives
            return self._died()
        reply = chan.receive(time.monotonic() + self.config.interrupt_grace_seconds)
        if reply is not None:
            reply = check_reply(reply, nonce, self.config.max_output_chars)
            if reply["error_type"] != "KeyboardInterrupt":  # it finished just as the time ran out
                return self._result(reply)
            note = f"TimeoutError: the cell ran longer than the wall-time limit of {wall:g}s and was interrupted"
            return dataclasses.replace(self._result(reply, timed_out=True), error=f"{note}\n{reply['error']}")
        self._res.kill()
        return ExecResult("", error=f"TimeoutError: the cell ran longer than the wall-time limit of {wall:g}s, "
                          "ignored the interrupt and was killed; the session state is lost, call restart()",
                          timed_out=True, alive=False)

    def _result(self, reply: dict[str, Any], timed_out: bool = False) -> ExecResult:
        error = reply["error"]
        cpu = reply["error_type"] == "CpuTimeExceeded"
        if cpu:
            error = f"{error}\n(limit: {self.config.cpu_seconds:g} CPU seconds per call)"
        return ExecResult(reply["stdout"], reply["result"], error, timed_out or cpu, True)

    def _died(self) -> ExecResult:
        proc = self._res.proc
        assert proc is not None
        _exited(proc, 2.0)
        self._res.kill()
        code = proc.returncode
        if code is not None and self.isolation == "namespace" and 128 < code <= 128 + 64:
            code = -(code - 128)  # bwrap reports a signal death of its command as 128 + the signal
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
        isolation = "namespace" if self.config.isolation == "auto" else self.config.isolation
        if isolation == "namespace":
            bwrap = iso.find_bwrap()
            if bwrap is None:
                raise SandboxError(_NO_BWRAP)
            cmd, fds, owner = self._namespace_command(bwrap)
        else:
            log.warning("sandbox: isolation='unsafe-process' runs cells with no kernel isolation")
            cmd, fds, owner = [sys.executable, "-I", "-B", str(_WORKER)], [], {}
        self._spawn(isolation, cmd, fds, owner)

    def _namespace_command(self, bwrap: str) -> tuple[list[str], list[int], dict[str, Any]]:
        res, cfg = self._res, self.config
        root = os.geteuid() == 0
        try:
            seccomp = build_filter()
        except RuntimeError as e:
            raise SandboxError(str(e)) from None
        if root and res.lease is None:
            res.lease = iso.UidLease()
            if self._owns_workspace:
                iso.mount_tmpfs(self.workspace, cfg.workspace_mb, res.lease.uid)
                res.tmpfs = self.workspace
            else:
                iso.chown_tree_nofollow(self.workspace, res.lease.uid)
        uid = res.lease.uid if res.lease is not None else os.getuid()
        if root:
            os.chmod(self._base, 0o711)  # the session uid passes through to its workspace, sees nothing else
            if not iso.reachable(str(self.workspace)):
                raise SandboxError(f"the workspace {self.workspace} is inside a folder that other users cannot "
                                   "enter; the sandbox runs as a uid of its own: give a folder outside it")
        seccomp_r, data_r = _pipe_with(seccomp), _pipe_with(_WORKER.read_bytes())
        status_r, status_w = os.pipe()
        res.status_r = status_r
        ro_dirs, ro_files, links = iso.system_view()
        fds = [seccomp_r, data_r, status_w]
        try:
            args = iso.bwrap_args(ro_dirs=ro_dirs, ro_files=ro_files, links=links, workspace=str(self.workspace),
                                  worker_fd=data_r, seccomp_fd=seccomp_r, status_fd=status_w, stage=root)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise SandboxError(f"the sandbox's file-system view could not be prepared: {e}") from e
        res.cgroup = SessionCgroup.create(f"ij-sandbox-{uid}-{os.getpid()}-{secrets.token_hex(4)}",
                                          pids=cfg.max_processes,
                                          memory_bytes=(cfg.memory_mb + cfg.workspace_mb + 64) << 20, cpus=cfg.cpus)
        owner = {"user": uid, "group": uid, "extra_groups": []} if root else {}
        return [bwrap, *args, "--", sys.executable, "-I", "-B", iso.WORKER_PATH], fds, owner

    def _spawn(self, isolation: str, cmd: list[str], fds: list[int], owner: dict[str, Any]) -> None:
        ws, cfg, res = str(self.workspace), self.config, self._res
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        err_r, err_w = os.pipe()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": ws, "TMPDIR": ws, "LANG": "C.UTF-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NUMEXPR_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": ws}
        try:
            proc = subprocess.Popen(cmd, stdin=req_r, stdout=resp_w, stderr=err_w, pass_fds=fds, env=env,
                                    cwd="/" if isolation == "namespace" else ws, start_new_session=True, **owner)
        except OSError as e:
            for fd in (req_w, resp_r, err_r):
                os.close(fd)
            res.stop()
            raise SandboxError(f"the sandbox could not be started: {e}") from e
        finally:
            for fd in (req_r, resp_w, err_w, *fds):  # the child's ends (bwrap's status pipe too: EOF if it dies)
                os.close(fd)
        res.proc, res.err_r = proc, err_r
        max_message = 36 * (cfg.max_output_chars + 200) + 65536
        res.channel = Channel(req_w, resp_r, max_message)
        nonce = secrets.token_hex(16)
        deadline = time.monotonic() + cfg.startup_seconds
        ready: Any = None
        try:
            res.find_worker(isolation, deadline)
            res.channel.send({**dataclasses.asdict(cfg), "isolation": isolation, "workspace": ws, "nonce": nonce,
                              "read_roots": iso.read_roots(), "preimport": list(cfg.preimport)}, deadline)
            ready = res.channel.receive(deadline)
            problem = "no answer in time" if ready is None else ready.get("error") if not ready.get("ready") \
                else "a reply to another call" if ready.get("nonce") != nonce else None
        except (ProtocolError, OSError, ValueError) as e:
            problem = str(e)
        if problem is not None:
            tail = res.stderr_tail()
            res.stop()
            raise SandboxError(f"the sandbox ({isolation} isolation) did not start: {problem}"
                               + (f"\nworker output:\n{tail}" if tail.strip() else ""))
        res.close_stderr()
        self.isolation = isolation
        self.info = {k: ready.get(k) for k in ("uid", "network_isolated", "preimported")}
        self.info.update(pid=res.worker_pid, host_uid=res.lease.uid if res.lease else os.getuid(),
                         cgroup=res.cgroup.summary if res.cgroup else None,
                         workspace_cap_mb=cfg.workspace_mb if res.tmpfs else None)


class _Resources:
    """The worker process, its pipes, cgroup, uid lease, workspace mount and the temporary folder: released by
    close() or, failing that, when the Sandbox is garbage-collected or the interpreter exits."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.status_r = self.err_r = -1
        self.init_pidfd = self.worker_pidfd = -1
        self.worker_pid: int | None = None
        self.cgroup: SessionCgroup | None = None
        self.lease: iso.UidLease | None = None
        self.tmpfs: Path | None = None

    def find_worker(self, isolation: str, deadline: float) -> None:
        """pidfds for the worker (interrupts) and, under bwrap, for its PID namespace's init (kill them all)."""
        assert self.proc is not None
        if isolation != "namespace":
            self.worker_pid, self.worker_pidfd = self.proc.pid, os.pidfd_open(self.proc.pid)
            return
        status = _read_status(self.status_r, deadline)
        init = int(status["child-pid"])
        self.init_pidfd = os.pidfd_open(init)
        while self.worker_pid is None:
            self.worker_pid = _child_of(init)
            if self.worker_pid is None:
                if time.monotonic() > deadline or _exited(self.proc, 0.0):
                    raise ProtocolError("bwrap started no worker")
                time.sleep(0.005)
        self.worker_pidfd = os.pidfd_open(self.worker_pid)
        if _child_of(init) != self.worker_pid:  # the pidfd is for the worker, not a recycled pid
            raise ProtocolError("the worker process changed while it was looked up")
        if self.cgroup is not None:  # the worker waits for its config: nothing of the cell's has run yet
            self.cgroup.attach([self.proc.pid, init, self.worker_pid])

    def signal_worker(self, sig: int) -> bool:
        try:
            signal.pidfd_send_signal(self.worker_pidfd, sig)
            return True
        except OSError:
            return False

    def stderr_tail(self) -> str:
        if self.err_r < 0:
            return ""
        os.set_blocking(self.err_r, False)
        try:
            return os.read(self.err_r, 8192).decode("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def close_stderr(self) -> None:
        if self.err_r >= 0:
            os.close(self.err_r)
            self.err_r = -1

    def kill(self) -> None:
        """SIGKILL the session: its PID namespace's init (the kernel then kills every process in it) and
        bwrap, or under unsafe-process the worker's process group; then reap."""
        if self.proc is None:
            return
        if self.init_pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet: the group id is still ours
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        for fd in (self.init_pidfd, self.worker_pidfd):  # a pidfd reads ready once its process has exited
            if fd >= 0:
                select.select([fd], [], [], 5.0)

    def stop(self) -> None:
        if self.channel is not None:
            for fd in (self.channel.req_w, self.channel.resp_r):
                os.close(fd)
            self.channel = None
        if self.proc is not None:
            _exited(self.proc, 1.0)  # EOF on its request pipe ends the worker's loop
            self.kill()
            self.proc = None
        for name in ("status_r", "err_r", "init_pidfd", "worker_pidfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self.worker_pid = None
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def release(self) -> None:
        self.stop()
        if self.tmpfs is not None:
            iso.unmount(self.tmpfs)
            self.tmpfs = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        shutil.rmtree(self.base, ignore_errors=True)


def _pipe_with(data: bytes) -> int:
    """A pipe's read end holding `data` (the write end closed): for bwrap's --seccomp and --ro-bind-data."""
    r, w = os.pipe()
    try:
        if len(data) > 65536:
            raise SandboxError(f"{len(data)} bytes do not fit a pipe's buffer")
        os.write(w, data)
    finally:
        os.close(w)
    return r


def _read_status(fd: int, deadline: float) -> dict[str, Any]:
    """bwrap's first status line ({"child-pid": ...}), bounded in size and time."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise ProtocolError("bwrap did not report its child in time")
        chunk = os.read(fd, 4096)
        if not chunk or len(data) > 65536:
            raise ProtocolError("bwrap exited before it started the worker")
        data += chunk
    return json.loads(data.split(b"\n", 1)[0])


def _child_of(pid: int) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                return int(entry)
    return None


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
