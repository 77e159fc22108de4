"""The sandboxed interpreter process. Standard library only: it runs as `python -I -B <this file>`.

`namespace` isolation: the host starts this file under bubblewrap, which has already put it in its own user,
PID, mount, network, IPC, UTS and cgroup namespaces, as uid nobody there (a host uid of its own), with a
read-only root holding only the system libraries and the Python installation, the workspace read-write,
no_new_privs and a seccomp filter. `unsafe-process` isolation: none of that, only what follows.

Start-up, in order (each step can only tighten what the previous one allowed):
1. The pipes arrive as fds 0 (requests) and 1 (replies); they move to 3 and 4, every other fd is closed and
   0, 1, 2 become /dev/null. The config is the first request.
2. `unsafe-process` only: a new network namespace when the kernel allows it.
3. Pre-import modules (numpy) while the file system is still fully readable to this process.
4. Resource limits: address space, CPU seconds (session cap; the soft limit is lowered before each call),
   processes (a per-user count: bubblewrap gives each session its own user), file size, open files, no cores.
5. An audit hook (PEP 578), a second layer under the kernel's: it refuses reads outside the workspace and the
   Python installation, writes outside the workspace, symbolic links pointing out of it, changing the working
   directory, sockets, subprocesses, fork, exec, signals, ctypes, native extensions from the workspace, and the
   gc walks that could reach the hook itself; C functions that act without an audit event are replaced by
   refusals. Audit hooks are not a security boundary on their own (PEP 578 says so).

Protocol: length-prefixed (8 bytes, big-endian) UTF-8 JSON messages. Every request carries a nonce that its
reply repeats; the first reply is {"ready": true, ...} or {"ready": false, "error": ...}. Cell code can write
to the reply pipe: the host bounds what it reads and ends the session on anything that is not the reply.
"""

import ast
import io
import json
import linecache
import os
import signal
import stat
import sys
import traceback

# ---- protocol -----------------------------------------------------------------------------------------------

def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(fd):
    size = int.from_bytes(_read_exact(fd, 8), "big")
    return json.loads(_read_exact(fd, size).decode("utf-8"))


def send(fd, message):
    data = json.dumps(message).encode("utf-8", "surrogatepass")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


# ---- isolation ----------------------------------------------------------------------------------------

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


def take_pipes():
    """Requests on fd 3, replies on fd 4, nothing else open; 0, 1 and 2 on /dev/null."""
    os.dup2(0, 3)
    os.dup2(1, 4)
    os.closerange(5, 1 << 20)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    return 3, 4


def quiet_stderr():
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 2)
    os.close(null)


def try_network_namespace():
    """`unsafe-process` isolation: take the network away when the kernel lets us (root, or user namespaces)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET) == 0
    except OSError:
        return False


def set_limits(cfg):
    import resource

    mb = 1024 * 1024
    limits = [(resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb),
              (resource.RLIMIT_NOFILE, cfg["max_open_files"]), (resource.RLIMIT_CORE, 0)]
    if os.geteuid() != 0:  # root ignores RLIMIT_NPROC; as nobody it caps threads + processes of the user
        limits.append((resource.RLIMIT_NPROC, cfg["max_processes"]))
    for which, value in limits:
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    total = int(cfg["cpu_seconds_total"])
    resource.setrlimit(resource.RLIMIT_CPU, (total, total + 2))


# ---- the audit hook ---------------------------------------------------------------------------------------

def install_audit_hook(workspace, read_roots, trust_dir_fds):
    """Refuse what the sandbox must not do. Everything the hook uses is bound here, at install time, so user
    code that patches modules or builtins later cannot change what it checks."""
    import pathlib
    import posix

    _type, _str, _bytes, _int, _len, _tuple = type, str, bytes, int, len, tuple
    _issubclass, _slice, _range = issubclass, slice, range
    _PermissionError, _OSError, _ImportError = PermissionError, OSError, ImportError
    _lstat, _stat, _readlink, _getcwd = posix.lstat, posix.stat, posix.readlink, posix.getcwd
    _S_ISLNK, _S_ISDIR = stat.S_ISLNK, stat.S_ISDIR
    _path_types = (pathlib.PosixPath, pathlib.PurePosixPath)
    _fspath, _pstr = pathlib.PurePath.__fspath__, pathlib.PurePath.__str__
    _PurePath = pathlib.PurePath
    ws = workspace.rstrip("/")
    roots = _tuple(r.rstrip("/") for r in read_roots) + (ws,)
    write_ok = (ws, "/dev/null")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    deny_exact = frozenset({
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "resource.prlimit",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "webbrowser.open", "os.startfile",
        "pty.spawn", "sys.remote_exec", "os.chroot"})
    deny_prefix = ("socket.", "syslog.", "ctypes.", "_ctypes.", "urllib.", "http.client.", "ftplib.", "smtplib.",
                   "poplib.", "imaplib.", "nntplib.", "telnetlib.", "winreg.", "_winapi.", "msvcrt.")
    protected_types = _path_types + (_PurePath,)
    # C modules whose functions touch files or processes without an audit event: the ones this worker has
    # defused may not be imported afresh, the others not at all (ImportError, as if they were missing).
    refused_imports = frozenset({"_posixsubprocess", "posix", "_signal", "_multiprocessing", "_posixshmem",
                                 "readline", "_ssl", "_dbm", "_gdbm", "_curses", "_tkinter"})

    def refuse(what):
        raise _PermissionError(f"sandbox: {what} is not allowed")

    def as_text(path):
        t = _type(path)
        if t is _str:
            return path
        if _issubclass(t, _str):
            return _str.__getitem__(path, _slice(None))  # exact str copy: no user-defined methods run
        if t is _bytes or _issubclass(t, _bytes):
            return _bytes.decode(_bytes.__getitem__(path, _slice(None)), "utf-8", "surrogateescape")
        if t in _path_types and t.__fspath__ is _fspath and t.__str__ is _pstr:
            return _pstr(path)
        refuse(f"a path of type {t.__name__}")

    def resolve(path, dir_fd=None):
        """Absolute, with '..' and symbolic links taken in the kernel's order (a link first, then the '..'
        after it, from where the link led); a missing tail stays as written."""
        if not path.startswith("/"):
            if dir_fd is None or dir_fd == -1:
                base = _getcwd()
            else:
                try:
                    base = _readlink(f"/proc/self/fd/{dir_fd}")
                except _OSError:
                    if trust_dir_fds:
                        return None  # namespace mode: the kernel's view is the boundary
                    refuse("a dir_fd whose folder cannot be resolved")
            path = base + "/" + path
        todo = [p for p in path.split("/") if p]
        todo.reverse()
        done, links = "", 0
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                done = done.rsplit("/", 1)[0]
                continue
            candidate = done + "/" + part
            try:
                is_link = _S_ISLNK(_lstat(candidate).st_mode)
            except _OSError:
                is_link = False
            if not is_link:
                done = candidate
                continue
            links += 1
            if links > 40:
                refuse("a path with too many symbolic links")
            target = _readlink(candidate)
            if target.startswith("/"):
                done = ""
            todo += reversed([p for p in target.split("/") if p])
        return done or "/"

    def under(path, bases):
        for base in bases:
            if path == base or path.startswith(base + "/"):
                return True
        return False

    def check_read(raw, dir_fd=None):
        path = resolve(as_text(raw), dir_fd)
        if path is not None and not under(path, roots):
            refuse(f"reading {path} (outside the workspace {ws})")
        return path

    def check_write(raw, dir_fd=None):
        path = resolve(as_text(raw), dir_fd)
        if path is not None and not under(path, write_ok):
            refuse(f"writing {path} (outside the workspace {ws})")
        return path

    def is_dir(path):
        try:
            return _S_ISDIR(_stat(path).st_mode)
        except _OSError:
            return False

    def hook(event, args):
        if event in deny_exact or event.startswith(deny_prefix):
            refuse(event)
        if event == "open":
            # The event does not carry os.open's dir_fd. Relative paths are checked against the working
            # directory, which is pinned to the workspace (os.chdir below), and no folder outside the
            # workspace may be opened, so every dir_fd a cell can hold is a workspace folder.
            path, _mode, flags = args
            if _type(path) is _int:
                return
            full = check_write(path) if flags & write_flags else check_read(path)
            if full is not None and not under(full, (ws,)) and is_dir(full):
                refuse(f"opening the folder {full}")
        elif event == "import":
            if args[0] in refused_imports:
                raise _ImportError(f"sandbox: module {args[0]} is not available", name=args[0])
            if args[1] is not None:
                check_read(args[1])
                if under(resolve(as_text(args[1])) or "", (ws,)):
                    refuse("loading a native extension from the workspace")
        elif event in ("os.listdir", "os.scandir"):
            path = args[0]
            if _type(path) is not _int:
                check_read("." if path is None else path)
        elif event in ("os.remove", "os.rmdir"):
            check_write(args[0], args[1])
        elif event == "os.mkdir":
            check_write(args[0], args[2])
        elif event in ("os.rename", "os.link"):
            check_write(args[0], args[2])
            check_write(args[1], args[3])
        elif event == "os.symlink":  # a link may only point into the workspace
            link = check_write(args[1], args[2])
            target = as_text(args[0])
            if link is not None:
                where = target if target.startswith("/") else link.rsplit("/", 1)[0] + "/" + target
                if not under(resolve(where) or "", (ws,)):
                    refuse(f"a symbolic link to {target} (outside the workspace {ws})")
        elif event in ("os.chmod", "os.chown", "os.utime", "os.lchmod", "os.chflags", "os.lchflags",
                       "os.setxattr", "os.removexattr"):
            if _type(args[0]) is not _int:
                check_write(args[0], args[-1] if event in ("os.chmod", "os.chown", "os.utime") else None)
        elif event == "os.truncate":
            if _type(args[0]) is not _int:
                check_write(args[0])
        elif event == "os.chdir":
            if _type(args[0]) is _int or resolve(as_text(args[0])) != ws:
                refuse("changing the working directory (it stays the workspace)")
        elif event in ("os.getxattr", "os.listxattr"):
            if _type(args[0]) is not _int:
                check_read("." if args[0] is None else args[0])
        elif event == "sqlite3.connect":
            name = as_text(args[0])
            if name != ":memory:" and not name.startswith("file::memory:"):
                check_write(name)
        elif event in ("object.__setattr__", "object.__delattr__"):
            for t in protected_types:
                if args[0] is t:
                    refuse(f"patching {t.__name__}")
        elif event.startswith("os.") and event not in ("os.putenv", "os.unsetenv", "os.walk", "os.fwalk",
                                                       "os.add_dll_directory"):
            refuse(event)  # an os operation this hook does not know how to check: closed by default

    sys.addaudithook(hook)
    guard_builtin_modules(refused_imports)


def guard_builtin_modules(refused):
    """importlib.util.module_from_spec(find_spec("posix")) builds a fresh built-in module (with the original
    functions this worker replaced) through _imp.create_builtin, which raises no audit event: refuse it there."""
    import _imp

    original = _imp.create_builtin
    names = frozenset(refused) | {"_imp"}

    def create_builtin(spec):
        name = getattr(spec, "name", None)
        if type(name) is not str or name in names:
            raise ImportError(f"sandbox: module {name} is not available", name=name)
        return original(spec)

    _imp.create_builtin = create_builtin


def disable_unaudited():
    """Functions that act without raising an audit event are replaced by refusals (the hook refuses
    importing their C modules afresh): subprocess's fork helper, fifo/device nodes, chroot, pidfd signals,
    POSIX semaphores and shared memory."""
    import _posixsubprocess
    import _signal
    import posix

    def refusal(what):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")
        return refuse

    _posixsubprocess.fork_exec = refusal("starting processes")
    for module_name, names in (("_multiprocessing", ("SemLock", "sem_unlink")),
                               ("_posixshmem", ("shm_open", "shm_unlink"))):
        try:  # named semaphores and shared memory live in /dev/shm, outside the workspace
            module = __import__(module_name)
        except ImportError:
            continue
        for name in names:
            original = getattr(module, name, None)
            stub = refusal(f"{module_name}.{name}")
            if isinstance(original, type):  # keep class constants (SemLock.SEM_VALUE_MAX) for importers
                stub = type(name, (), {**{k: v for k, v in vars(original).items() if k.isupper()},
                                       "__init__": stub})
            setattr(module, name, stub)
    for name in ("mkfifo", "mknod", "chroot", "pidfd_open"):
        for module in (posix, os):
            if hasattr(module, name):
                setattr(module, name, refusal(f"os.{name}"))
    for module in (_signal, signal):
        if hasattr(module, "pidfd_send_signal"):
            module.pidfd_send_signal = refusal("signal.pidfd_send_signal")


# ---- running cells ----------------------------------------------------------------------------------------

class Capture(io.TextIOBase):
    """stdout and stderr of a cell, interleaved as printed, kept up to `limit` characters."""

    def __init__(self, limit):
        self.limit, self.parts, self.size, self.dropped = limit, [], 0, 0

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(len(text), room)
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def text(self):
        out = "".join(self.parts)
        return out + (f"\n[... {self.dropped} more characters of output dropped]" if self.dropped else "")


class CpuTimeExceeded(BaseException):
    """Raised in the cell by SIGXCPU when the per-call CPU budget is spent."""


def _on_sigxcpu(signum, frame):
    raise CpuTimeExceeded("CPU time limit for this call exceeded")


def _clip(text, limit):
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def set_cpu_budget(seconds):
    """Soft RLIMIT_CPU = CPU used so far + this call's budget (SIGXCPU at the soft limit ends the cell); the
    hard limit stays the session cap. Cells may raise their soft limit up to that cap themselves: the per-call
    budget is a guard against runaway loops, the wall-time limit and the session cap are the firm bounds."""
    import math
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (min(hard, math.ceil(usage.ru_utime + usage.ru_stime + seconds)), hard))


def format_error(e):
    """The traceback of a failed cell without this worker's frames (its exec loop and the audit hook)."""
    te = traceback.TracebackException(type(e), e, e.__traceback__)
    seen = set()
    stack = [te]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.stack = traceback.StackSummary.from_list([f for f in item.stack if f.filename != __file__])
        stack += [item.__cause__, item.__context__]
    return "".join(te.format()).rstrip()


def run_cell(code, namespace, counter, limit, cpu_seconds):
    """Execute like an IPython cell: run the statements; if the last one is an expression, return its repr."""
    filename = f"<cell-{counter}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    capture = Capture(limit)
    out = {"stdout": "", "result": None, "error": None, "error_type": None}
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = capture
    try:
        set_cpu_budget(cpu_seconds)
        if signal.SIGINT in signal.sigpending():  # an interrupt meant for the previous cell, sent as it ended
            signal.sigwait([signal.SIGINT])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # the parent interrupts only cells
        tree = ast.parse(code, filename, "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, filename, "exec"), namespace)  # noqa: S102 - running the user's code is the job
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                out["result"] = _clip(repr(value), limit)
    except BaseException as e:  # noqa: BLE001 - a cell's failure is its result
        out["error_type"] = type(e).__name__
        out["error"] = _clip(format_error(e), limit)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
        sys.stdout, sys.stderr = saved
    out["stdout"] = capture.text()
    return out


def main():
    rfd, wfd = take_pipes()
    cfg = recv(rfd)
    try:
        os.chdir(cfg["workspace"])
        network_isolated = cfg["isolation"] == "namespace" or try_network_namespace()
        preimported = []
        for name in cfg["preimport"]:
            try:
                __import__(name)
                preimported.append(name)
            except ImportError:
                pass
        set_limits(cfg)
        signal.signal(signal.SIGXCPU, _on_sigxcpu)
        disable_unaudited()
        if cfg["audit_hook"]:
            install_audit_hook(cfg["workspace"], cfg["read_roots"], trust_dir_fds=cfg["isolation"] == "namespace")
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises a clear error
        send(wfd, {"ready": False, "nonce": cfg["nonce"],
                   "error": "".join(traceback.format_exception(type(e), e, e.__traceback__))})
        return
    quiet_stderr()
    send(wfd, {"ready": True, "nonce": cfg["nonce"], "pid": os.getpid(), "uid": os.getuid(),
               "network_isolated": network_isolated, "preimported": preimported})
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    counter = 0
    while True:
        try:
            request = recv(rfd)
        except EOFError:
            return
        counter += 1
        try:
            reply = run_cell(request["code"], namespace, counter, cfg["max_output_chars"], cfg["cpu_seconds"])
        except BaseException as e:  # noqa: BLE001 - a signal that landed while the cell's error was formatted
            reply = {"stdout": "", "result": None, "error": f"{type(e).__name__}: {e}",
                     "error_type": type(e).__name__}
        reply["nonce"] = request["nonce"]
        send(wfd, reply)


if __name__ == "__main__":
    main()
