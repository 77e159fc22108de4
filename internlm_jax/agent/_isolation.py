"""What `namespace` isolation is built from: bubblewrap's command line, a host uid leased to one session,
and the session's workspace (a size-capped tmpfs the host mounts, or a folder the caller gave)."""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import os
import random
import shutil
import stat
import sys
import sysconfig
import threading
from pathlib import Path
from typing import ClassVar

LEASES = Path("/run/internlm-jax-sandbox")
UID_BASE, UID_COUNT = 0x5A000000, 1 << 20   # far above any login or system uid
INSIDE_UID = 65534                           # the uid the worker sees in its user namespace (nobody)
WORKER_PATH = "/opt/internlm-jax-sandbox/worker.py"
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
VIEWS = Path("/run/internlm-jax-sandbox-views")
MNT_DETACH = 2
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384


def find_bwrap() -> str | None:
    return shutil.which("bwrap", path="/usr/bin:/usr/local/bin:/bin:" + os.environ.get("PATH", ""))


class UidLease:
    """A host uid no other live session uses: a lock file per uid, held (flock) while this session lives.
    A lock left by a process that died is free again (the kernel dropped its flock)."""

    def __init__(self) -> None:
        LEASES.mkdir(mode=0o700, exist_ok=True)
        for _ in range(64):
            uid = UID_BASE + random.randrange(UID_COUNT)
            fd = os.open(LEASES / f"uid-{uid}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise OSError("no free sandbox uid after 64 tries")

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.unlink(LEASES / f"uid-{self.uid}")
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount_tmpfs(path: Path, size_mb: int, uid: int) -> None:
    """A size-capped tmpfs owned by the session's uid (root only): the cap on the workspace's total bytes."""
    opts = f"size={size_mb}m,nr_inodes={max(1024, size_mb * 64)},mode=0700,uid={uid},gid={uid}"
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc().mount(b"tmpfs", str(path).encode(), b"tmpfs", ctypes.c_ulong(flags), opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mounting the workspace tmpfs on {path}: {os.strerror(e)}")


def unmount(path: Path) -> None:
    """Detach the workspace tmpfs: its whole tree goes at once, nothing in it is walked or followed."""
    _libc().umount2(str(path).encode(), MNT_DETACH)


def chown_tree_nofollow(top: Path, uid: int) -> None:
    """Give a caller's workspace folder to the session uid, never following a link: every folder is opened
    relative to its parent's fd (os.fwalk checks it is the folder it listed) and every entry is changed with
    AT_SYMLINK_NOFOLLOW. Runs before the first start only, when no sandbox process can race it."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.chown(fd, uid, uid)
    finally:
        os.close(fd)
    for _, dirs, files, dir_fd in os.fwalk(top, follow_symlinks=False):
        for name in dirs + files:
            os.chown(name, uid, uid, dir_fd=dir_fd, follow_symlinks=False)


def reachable(path: str) -> bool:
    """Whether any uid can walk down to `path` (every folder above it searchable by others)."""
    parts = Path(path).parents
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in parts)


class HostView:
    """Read-only bind mounts, made once per host process, of the Python folders that sit below a folder the
    session uid may not enter (a pyenv in /root): bwrap, running as that uid, binds them from here. Removed
    at exit; those of a process that died are removed by the next one."""

    _lock = threading.Lock()
    _mounted: ClassVar[dict[str, str]] = {}

    @classmethod
    def source(cls, path: str) -> str:
        if reachable(path):
            return path
        with cls._lock:
            if path not in cls._mounted:
                base = VIEWS / str(os.getpid())
                if not cls._mounted:
                    _clear_stale_views()
                    base.mkdir(mode=0o755, parents=True, exist_ok=True)
                    os.chmod(VIEWS, 0o755)
                    atexit.register(cls.unmount_all)
                target = base / str(len(cls._mounted))
                if os.path.isdir(path):
                    target.mkdir(mode=0o755, exist_ok=True)
                else:
                    target.touch(mode=0o644, exist_ok=True)
                _mount(path, str(target), MS_BIND | MS_REC)
                _mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
                cls._mounted[path] = str(target)
            return cls._mounted[path]

    @classmethod
    def unmount_all(cls) -> None:
        with cls._lock:
            for target in cls._mounted.values():
                unmount(Path(target))
            cls._mounted.clear()
            shutil.rmtree(VIEWS / str(os.getpid()), ignore_errors=True)


def _clear_stale_views() -> None:
    for entry in VIEWS.iterdir() if VIEWS.is_dir() else []:
        if entry.name.isdigit() and not os.path.exists(f"/proc/{entry.name}"):
            for target in entry.iterdir():
                unmount(target)
            shutil.rmtree(entry, ignore_errors=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    enc = None if source is None else source.encode()
    if _libc().mount(enc, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bind-mounting {source} on {target}: {os.strerror(e)}")


def bwrap_args(*, ro_dirs: list[str], ro_files: list[str], links: dict[str, str], workspace: str,
               worker_fd: int, seccomp_fd: int, status_fd: int, stage: bool) -> list[str]:
    """bwrap's arguments (the fds named in them are the caller's to pass and close). `stage`: bwrap runs as a
    uid of its own, which reaches folders under /root through `HostView`."""
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID), "--hostname", "sandbox"]
    for path in ro_dirs + ro_files:
        args += ["--ro-bind", HostView.source(path) if stage else path, path]
    for link, target in links.items():
        args += ["--symlink", target, link]
    for dev in DEVICES:
        if os.path.exists(dev) and stat.S_ISCHR(os.stat(dev).st_mode):
            args += ["--dev-bind", dev, dev]
    args += ["--perms", "0444", "--ro-bind-data", str(worker_fd), WORKER_PATH]
    args += ["--bind", workspace, workspace, "--remount-ro", "/", "--chdir", workspace]
    return args + ["--seccomp", str(seccomp_fd), "--json-status-fd", str(status_fd)]


# ---- what the sandbox may see ------------------------------------------------------------------------------

def python_dirs() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})


def read_roots() -> list[str]:
    """Readable to the audit hook besides the workspace: the Python installation and a few devices."""
    extra = ["/usr/share/zoneinfo", *DEVICES]
    return outermost(python_dirs() + [p for p in extra if os.path.exists(p)])


def system_view() -> tuple[list[str], list[str], dict[str, str]]:
    """Bound read-only into the sandbox: (folders, files, symbolic links -> their targets)."""
    system = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
              "/etc/localtime"]
    links = {p: os.readlink(p) for p in system if os.path.islink(p)}
    real = outermost([p for p in system if os.path.exists(p) and p not in links] + python_dirs())
    return [p for p in real if os.path.isdir(p)], [p for p in real if os.path.isfile(p)], links


def outermost(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out
