"""The sandbox's seccomp filter: a classic-BPF program, built by hand (no libseccomp), for bubblewrap's
`--seccomp FD`. It denies (EPERM) every way of signalling or inspecting another process, of making or
joining namespaces, and the kernel interfaces a Python cell never needs (mounts, modules, keys, bpf,
io_uring, ...). Processes inside the session's own PID namespace are all the session's, so the one signal
call it keeps is tgkill to the worker itself (pid 2 there), which raise() and abort() use.

x86_64 only: on other architectures `build_filter` raises RuntimeError (the syscall numbers differ).
"""

from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
WORKER_PID = 2  # bubblewrap runs its reaper as pid 1 and the command as pid 2

# x86_64 numbers (asm/unistd_64.h)
DENIED = {
    # signals and other processes
    "kill": 62, "tkill": 200, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_open": 434,
    "pidfd_send_signal": 424, "pidfd_getfd": 438, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "process_madvise": 440, "kcmp": 312,
    # namespaces and mounts
    "setns": 308, "unshare": 272, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "open_by_handle_at": 304, "name_to_handle_at": 303,
    # kernel attack surface
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "syslog": 103, "vhangup": 153, "uselib": 134,
    "ioperm": 173, "iopl": 172, "lookup_dcookie": 212,
}
NR_CLONE, NR_CLONE3, NR_TGKILL = 56, 435, 234
CLONE_NEW_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                   | 0x40000000 | 0x00000080)  # NEWNS CGROUP UTS IPC USER PID NET TIME

# classic BPF
LD_W_ABS, JEQ_K, JSET_K, JGE_K, RET_K = 0x20, 0x15, 0x45, 0x35, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
OFF_NR, OFF_ARCH, OFF_ARG0_LO, OFF_ARG0_HI = 0, 4, 16, 20  # struct seccomp_data, little-endian


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _errno(e: int) -> int:
    return RET_ERRNO | e


def build_filter() -> bytes:
    """The filter as the raw `struct sock_filter` array that bwrap's --seccomp reads."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the sandbox's seccomp filter knows x86_64 syscall numbers only; this machine is "
                           f"{platform.machine()}: use isolation='unsafe-process' only for trusted code")
    deny = _ins(RET_K, _errno(errno.EPERM))
    prog = [
        _ins(LD_W_ABS, OFF_ARCH),
        _ins(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _ins(RET_K, RET_KILL_PROCESS),              # i386 entry from a 64-bit process: never legitimate here
        _ins(LD_W_ABS, OFF_NR),
        _ins(JGE_K, X32_SYSCALL_BIT, 0, 1),         # the x32 ABI's numbers alias the denied calls
        deny,
    ]
    for nr in sorted(DENIED.values()):
        prog += [_ins(JEQ_K, nr, 0, 1), deny]
    allow = _ins(RET_K, RET_ALLOW)
    prog += [
        _ins(JEQ_K, NR_CLONE3, 0, 1),   # its flags sit behind a pointer: ENOSYS makes glibc fall back to clone
        _ins(RET_K, _errno(errno.ENOSYS)),
        _ins(JEQ_K, NR_CLONE, 0, 4),    # clone: threads and fork yes, new namespaces no
        _ins(LD_W_ABS, OFF_ARG0_LO),
        _ins(JSET_K, CLONE_NEW_FLAGS, 0, 1),
        deny,
        allow,
        _ins(JEQ_K, NR_TGKILL, 0, 5),   # tgkill: only to the worker's own thread group
        _ins(LD_W_ABS, OFF_ARG0_HI),
        _ins(JEQ_K, 0, 0, 2),
        _ins(LD_W_ABS, OFF_ARG0_LO),
        _ins(JEQ_K, WORKER_PID, 1, 0),
        deny,
        allow,
    ]
    return b"".join(prog)
