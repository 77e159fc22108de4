"""Issue 23: what a malicious model-written program tried against the sandbox, one test per attempt. Most run
with the audit hook off, as if a cell had defeated it: the kernel (bubblewrap's namespaces, the seccomp
filter, cgroups/rlimits, the workspace tmpfs) and the host's protocol checks must hold on their own."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from internlm_jax.agent import Sandbox
from internlm_jax.agent.sandbox import available

IS_ROOT = os.geteuid() == 0
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only"),
              pytest.mark.skipif(not available(), reason="bubblewrap (bwrap) is not installed: "
                                 "apt-get install bubblewrap")]
needs_root = pytest.mark.skipif(not IS_ROOT, reason="per-session uids and the workspace tmpfs need root")
HOOK_OFF = {"isolation": "namespace", "audit_hook": False, "wall_seconds": 3, "interrupt_grace_seconds": 1,
            "memory_mb": 512, "preimport": ()}


def last_line(result):
    return (result.error or "").strip().splitlines()[-1]


def pid_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def in_namespace(ns: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                alive = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                if alive and os.readlink(f"/proc/{entry}/ns/pid") == ns:
                    out.append(int(entry))
            except OSError:
                pass
    return out


# ---- 1. one session kills another ------------------------------------------------------------------------

SIGNAL_EVERYONE = """
import ctypes, errno, importlib.util, os, signal
posix = importlib.util.module_from_spec(importlib.util.find_spec("posix"))
reached = []
for pid in range(1, 1 << 15):
    for call in (lambda: posix.pidfd_open(pid), lambda: posix.kill(pid, signal.SIGKILL)):
        try:
            call()
            reached.append(pid)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ESRCH):
                reached.append((pid, e.errno))
libc = ctypes.CDLL(None, use_errno=True)
reached, libc.unshare(0x10000000), ctypes.get_errno() == errno.EPERM, os.getpid()
"""


def test_a_session_cannot_see_or_signal_another():
    with Sandbox(**HOOK_OFF) as a, Sandbox(**HOOK_OFF) as b:
        assert pid_ns(a.pid) != pid_ns(b.pid) != pid_ns(os.getpid())
        r = a.run(SIGNAL_EVERYONE)
        assert r.result == "([], -1, True, 2)", r  # no pid reachable, no new user namespace
        assert a.alive and b.alive and b.run("6 * 7").result == "42"


def test_a_fresh_builtin_module_is_refused_by_the_hook():
    with Sandbox(isolation="namespace", wall_seconds=3, preimport=()) as sb:
        for module in ("posix", "_signal", "_imp"):
            r = sb.run(f"import importlib.util as u; u.module_from_spec(u.find_spec({module!r}))")
            assert last_line(r) == f"ImportError: sandbox: module {module} is not available", r


# ---- 2. the host caller hangs or crashes -----------------------------------------------------------------

def timed(sb, code):
    start = time.monotonic()
    r = sb.run(code)
    return r, time.monotonic() - start


def test_a_header_and_silence_is_cut_at_the_wall_limit():
    with Sandbox(**HOOK_OFF) as sb:
        r, took = timed(sb, "import os, time\nos.write(4, (100).to_bytes(8, 'big'))\ntime.sleep(60)")
        assert took < 3 + 1 + 2 and r.timed_out and not r.alive and "call restart()" in r.error, (took, r)
        sb.restart()
        assert sb.run("1 + 1").result == "2"


def test_a_huge_header_or_body_is_refused_without_reading_it():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Sandbox(**HOOK_OFF) as sb:
        r, took = timed(sb, "import os, time\nos.write(4, (2**62).to_bytes(8, 'big'))\ntime.sleep(60)")
        assert took < 2 and not r.alive and "announced a 4611686018427387904-byte reply" in r.error, (took, r)
        sb.restart()
        r, took = timed(sb, "import os\nos.write(4, (600 << 20).to_bytes(8, 'big'))\n"
                            "for _ in range(600):\n    os.write(4, b'x' * (1 << 20))")
        assert took < 2 and not r.alive and "broke the protocol" in r.error, (took, r)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: nothing read whole


FORGE = """import json, os, sys
nonce = {nonce}
body = json.dumps({{"stdout": "", "result": "'forged'", "error": None, "error_type": None, "nonce": nonce}}).encode()
os.write(4, len(body).to_bytes(8, "big") + body)
"""


def test_forged_replies_never_put_replies_out_of_step():
    with Sandbox(**HOOK_OFF) as sb:
        r = sb.run(FORGE.format(nonce="'0' * 32"))  # a guessed nonce
        assert not r.alive and "does not answer this call" in r.error, r
        sb.restart()
        # the current call's nonce, read from the worker's frame: the cell authors its own result (it could
        # anyway), and the worker's real reply that follows ends the session instead of answering the next call
        r = sb.run(FORGE.format(nonce="sys._getframe(2).f_locals['request']['nonce']"))
        assert r.result == "'forged'" and r.alive
        time.sleep(0.2)
        r = sb.run("'next'")
        assert r.result is None and not r.alive and "nobody asked for" in r.error, r
        sb.restart()
        assert [sb.run(f"{i} * 2").result for i in range(3)] == ["0", "2", "4"]


def test_the_worker_holds_no_host_fd():
    with Sandbox(**HOOK_OFF) as sb:
        r = sb.run("import os, stat\nkinds = []\nfor fd in range(4096):\n    try:\n"
                   "        kinds.append((fd, stat.S_IFMT(os.fstat(fd).st_mode)))\n    except OSError:\n        pass\n"
                   "[(fd, {stat.S_IFIFO: 'fifo', stat.S_IFCHR: 'chr'}.get(k, k)) for fd, k in kinds]")
        assert r.result == "[(0, 'chr'), (1, 'chr'), (2, 'chr'), (3, 'fifo'), (4, 'fifo')]", r


# ---- 3. limits are per session ---------------------------------------------------------------------------

THREAD_BOMB = """import threading, time
started = 0
try:
    for _ in range(300):
        threading.Thread(target=time.sleep, args=(20,), daemon=True).start()
        started += 1
except RuntimeError:
    pass
started
"""


def test_a_thread_bomb_leaves_other_sessions_running():
    one_thread = "import threading\nt = threading.Thread(target=print, args=('ok',))\nt.start()\nt.join()"
    with Sandbox(isolation="namespace", wall_seconds=5, preimport=()) as a, \
            Sandbox(isolation="namespace", wall_seconds=5, preimport=()) as b:
        assert int(a.run(THREAD_BOMB).result) < 32
        assert b.run(one_thread).stdout == "ok\n"
        with Sandbox(isolation="namespace", wall_seconds=5, preimport=()) as c:
            assert c.run(one_thread).stdout == "ok\n"


@needs_root
def test_the_workspace_total_is_capped():
    with Sandbox(isolation="namespace", wall_seconds=5, workspace_mb=16, max_file_mb=8, preimport=()) as sb:
        r = sb.run("import errno\nwritten = 0\ntry:\n    for i in range(10):\n"
                   "        with open(f'f{i}', 'wb') as f:\n            f.write(b'x' * (4 << 20))\n"
                   "        written += 4\nexcept OSError as e:\n    code = errno.errorcode[e.errno]\nwritten, code")
        assert r.result in ("(12, 'ENOSPC')", "(16, 'ENOSPC')"), r
        assert sum(p.stat().st_size for p in sb.workspace.iterdir()) <= 16 << 20


# ---- 4. once the hook is defeated --------------------------------------------------------------------------

@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the crafted bytecode is CPython 3.11's")
def test_crafted_bytecode_crashes_only_its_own_session():
    with Sandbox(isolation="namespace", wall_seconds=5, preimport=()) as sb:
        r = sb.run("def f():\n    return 1\nf.__code__ = f.__code__.replace(co_code=bytes([151, 0, 100, 250, 83, 0]))"
                   "\nf()")
        assert not r.alive and r.error.startswith("the sandbox process died"), r
        sb.restart()
        assert sb.run("'fine'").result == "'fine'"


def test_a_forked_setsid_child_dies_with_the_session():
    sb = Sandbox(**HOOK_OFF).start()
    ns = pid_ns(sb.pid)
    r = sb.run("import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(60)\n"
               "    os._exit(0)\npid")
    assert r.ok and len(in_namespace(ns)) == 3  # bwrap's init, the worker, the child
    sb.close()
    assert in_namespace(ns) == []


@needs_root
def test_restart_follows_no_link_planted_in_the_workspace(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    with Sandbox(**HOOK_OFF) as sb:
        r = sb.run(f"import os\nos.symlink({str(victim)!r}, 'link')\nos.symlink({str(tmp_path)!r}, 'dir')\n"
                   "os.mkdir('d')\nos.symlink('..', 'd/up')")
        assert r.ok, r
        sb.restart()
        assert last_line(sb.run("open('link').read()")).startswith("FileNotFoundError")
    st = victim.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777, victim.read_text()) == (0, 0, 0o600, "secret")


@needs_root
def test_a_given_workspace_is_handed_over_without_following_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("secret")
    ws = Path(tempfile.mkdtemp(prefix="ij-ws-", dir="/tmp"))
    try:
        (ws / "notes.txt").write_text("kept")
        (ws / "link").symlink_to(victim)
        (ws / "dirlink").symlink_to(tmp_path)
        with Sandbox(isolation="namespace", workspace=str(ws), wall_seconds=5, preimport=()) as sb:
            assert sb.run("open('notes.txt').read()").result == "'kept'"
            assert ws.stat().st_uid == sb.info["host_uid"] == (ws / "notes.txt").stat().st_uid
        assert (victim.stat().st_uid, tmp_path.stat().st_uid) == (0, 0)
        assert (ws / "notes.txt").read_text() == "kept"
    finally:
        shutil.rmtree(ws)


@pytest.mark.parametrize("isolation", ["namespace", "unsafe-process"])
def test_the_hook_resolves_links_before_dotdot(isolation):
    with Sandbox(isolation=isolation, wall_seconds=5, preimport=()) as sb:
        assert sb.run("import os\nos.mkdir('d')\nos.symlink('..', 'd/up')").ok  # a link to the workspace: fine
        for code in ("import os; os.listdir('d/up/..')", "open('d/up/../escape', 'w')"):
            assert "PermissionError: sandbox: " in last_line(sb.run(code)), code
