"""The sandbox's guard: the first code the child process runs (`python -I -c <this file's text> settings.json`).

It limits its own process with rlimits, drops every capability, then applies Landlock and seccomp, reports which
layers took effect on its first stderr line, and runs main.py in a fresh __main__ module (so the guard's names
are not visible to the code). picochat/sandbox.py says what each layer stops.

Importing this module does nothing; only running it as __main__ locks the process down. It uses the standard
library only (the child has no picochat on its path). Its numbers are the kernel's ABI: linux/landlock.h,
linux/seccomp.h, linux/filter.h, linux/capability.h, linux/prctl.h, and the syscall tables of x86-64 and
asm-generic/unistd.h (aarch64).
"""

import ctypes
import json
import os
import platform
import resource
import struct
import sys
import types

# System calls by architecture. DENIED: refused outright (EPERM). SELF_ONLY: allowed only on the sandbox itself,
# by the argument that names the target process (see _self_only). The rest (clone, clone3, signals) is special.
_X86_64 = {
    "audit_arch": 0xC000003E,
    "clone": 56, "clone3": 435, "kill": 62, "tkill": 200, "tgkill": 234,
    "prlimit64": 302, "sched_setaffinity": 203, "sched_setscheduler": 144, "sched_setparam": 142,
    "sched_setattr": 314, "setpriority": 141, "ioprio_set": 251, "capget": 125, "capset": 126, "fcntl": 72,
    "ioctl": 16,
    "denied": dict(shmget=29, semget=64, msgget=68,
        fork=57, vfork=58, execve=59, execveat=322, socket=41, socketpair=53, rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, ptrace=101,
        process_vm_readv=310, process_vm_writev=311, process_madvise=440, process_mrelease=448, kcmp=312,
        migrate_pages=256, move_pages=279, io_uring_setup=425, bpf=321, perf_event_open=298, userfaultfd=323,
        keyctl=250, add_key=248, request_key=249, mount=165, umount2=166, pivot_root=155, open_tree=428,
        move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, unshare=272,
        setns=308, chroot=161, init_module=175, finit_module=313, delete_module=176, kexec_load=246, reboot=169,
        swapon=167, swapoff=168, sethostname=170, setdomainname=171, settimeofday=164, clock_settime=227,
        adjtimex=159, syslog=103, acct=163, quotactl=179, quotactl_fd=443, iopl=172, ioperm=173, vhangup=153,
        lookup_dcookie=212, nfsservctl=180, fanotify_init=300, fanotify_mark=301, name_to_handle_at=303,
        open_by_handle_at=304, mknod=133, mknodat=259, chmod=90, fchmod=91, fchmodat=268, fchmodat2=452,
        chown=92, fchown=93, lchown=94, fchownat=260, setxattr=188, lsetxattr=189, fsetxattr=190,
        removexattr=197, lremovexattr=198, fremovexattr=199),
}  # fmt: skip
_AARCH64 = {
    "audit_arch": 0xC00000B7,
    "clone": 220, "clone3": 435, "kill": 129, "tkill": 130, "tgkill": 131,
    "prlimit64": 261, "sched_setaffinity": 122, "sched_setscheduler": 119, "sched_setparam": 118,
    "sched_setattr": 274, "setpriority": 140, "ioprio_set": 30, "capget": 90, "capset": 91, "fcntl": 25,
    "ioctl": 29,
    "denied": dict(shmget=194, semget=190, msgget=186,
        execve=221, execveat=281, socket=198, socketpair=199, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
        pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, ptrace=117, process_vm_readv=270,
        process_vm_writev=271, process_madvise=440, process_mrelease=448, kcmp=272, migrate_pages=238,
        move_pages=239, io_uring_setup=425, bpf=280, perf_event_open=241, userfaultfd=282, keyctl=219,
        add_key=217, request_key=218, mount=40, umount2=39, pivot_root=41, open_tree=428, move_mount=429,
        fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, unshare=97, setns=268, chroot=51,
        init_module=105, finit_module=273, delete_module=106, kexec_load=104, reboot=142, swapon=224,
        swapoff=225, sethostname=161, setdomainname=162, settimeofday=170, clock_settime=112, adjtimex=171,
        syslog=116, acct=89, quotactl=60, quotactl_fd=443, vhangup=58, lookup_dcookie=18, nfsservctl=42,
        fanotify_init=262, fanotify_mark=263, name_to_handle_at=264, open_by_handle_at=265, mknodat=33,
        fchmod=52, fchmodat=53, fchmodat2=452, fchown=55, fchownat=54, setxattr=5, lsetxattr=6, fsetxattr=7,
        removexattr=14, lremovexattr=15, fremovexattr=16),
}  # fmt: skip
_TABLES = {"x86_64": _X86_64, "aarch64": _AARCH64, "arm64": _AARCH64}

# prctl options (linux/prctl.h)
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 23, 24, 22, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER = 4, 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def main() -> None:
    settings = json.loads(sys.argv[1])
    protections = {"rlimits": True, "capabilities": False, "landlock": 0, "seccomp": False}
    protections["rlimits"] = set_limits(settings)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    table = _TABLES.get(platform.machine()) if sys.platform == "linux" else None
    if table is not None:
        protections["capabilities"] = drop_capabilities(libc, table)
    # No-new-privs: required for unprivileged Landlock and seccomp, and nothing the code could exec (exec is
    # denied anyway) may gain privileges through setuid bits or file capabilities.
    prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    if sys.platform == "linux":
        protections["landlock"] = landlock(libc, settings["workdir"])
    if table is not None:
        protections["seccomp"] = seccomp(libc, table)
    sys.stderr.write("\x00picochat-sandbox " + json.dumps(protections) + "\n")
    sys.stderr.flush()
    run_main_py()


def set_limits(settings: dict) -> bool:
    """Soft = hard for every limit, so the code can lower its limits but not raise them back."""
    ok = True
    limits = [
        (resource.RLIMIT_CPU, settings["cpu_seconds"]),
        (resource.RLIMIT_AS, settings["memory_bytes"]),
        (resource.RLIMIT_FSIZE, settings["file_bytes"]),
        (resource.RLIMIT_NOFILE, settings["open_files"]),
        (resource.RLIMIT_NPROC, 0),
        (resource.RLIMIT_CORE, 0),
    ]
    for name in ("RLIMIT_RTPRIO", "RLIMIT_NICE", "RLIMIT_MSGQUEUE"):  # Linux only
        if hasattr(resource, name):
            limits.append((getattr(resource, name), 0))  # no real-time priority, no nice < 20, no mqueues
    for kind, value in limits:
        hard = resource.getrlimit(kind)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            ok = False
    return ok


def syscall(libc, number: int, *args) -> int:
    """A raw system call, every argument passed as a full machine word (the call is variadic)."""
    words = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]  # buffers and pointers as they are
    return libc.syscall(ctypes.c_long(number), *words)


def prctl(libc, option: int, *args: int) -> int:
    words = [ctypes.c_ulong(a) for a in (list(args) + [0, 0, 0, 0])[:4]]
    return libc.prctl(ctypes.c_int(option), *words)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities(libc, table: dict) -> bool:
    """Empty every capability set. True when none is left that the code could use.

    The bounding set goes first (PR_CAPBSET_DROP needs CAP_SETPCAP, which capset then removes); the ambient set
    is cleared; capset empties effective, permitted and inheritable. An unprivileged user has no effective or
    permitted capabilities to begin with and cannot shrink the bounding set, which only matters at exec (denied,
    and no-new-privs). Root without capabilities keeps uid 0, but the kernel's privilege checks all fail.
    """
    cap = 0
    while prctl(libc, PR_CAPBSET_READ, cap) >= 0:  # -1 (EINVAL) past the kernel's last capability
        prctl(libc, PR_CAPBSET_DROP, cap)  # fails (EPERM) for an unprivileged user: nothing to drop then
        cap += 1
    prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    empty = (_CapData * 2)()
    syscall(libc, table["capset"], ctypes.pointer(_CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), empty)
    held = (_CapData * 2)()
    if syscall(libc, table["capget"], ctypes.pointer(_CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), held) != 0:
        return False
    if any(d.effective or d.permitted or d.inheritable for d in held):
        return False
    bounding = [c for c in range(cap) if prctl(libc, PR_CAPBSET_READ, c) == 1]
    return not bounding or os.geteuid() != 0


def landlock(libc, workdir: str) -> int:
    """Restrict file access (and TCP, signals, abstract sockets where the ABI allows). Returns the ABI in force,
    0 when Landlock is not available."""
    abi = syscall(libc, 444, 0, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    fs_rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        fs_rights |= 1 << 13  # REFER
    if abi >= 3:
        fs_rights |= 1 << 14  # TRUNCATE
    if abi >= 5:
        fs_rights |= 1 << 15  # IOCTL_DEV
    read_rights = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR
    file_only = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # the rights that apply to a single file
    device_nodes = (1 << 6) | (1 << 11)  # MAKE_CHAR, MAKE_BLOCK: handled, so denied everywhere, temp dir included
    if abi >= 6:
        attr, size = struct.pack("=QQQ", fs_rights, 3, 3), 24  # TCP bind+connect; scope: abstract sockets, signals
    elif abi >= 4:
        attr, size = struct.pack("=QQ", fs_rights, 3), 16
    else:
        attr, size = struct.pack("=Q", fs_rights), 8
    ruleset = syscall(libc, 444, ctypes.create_string_buffer(attr, size), size, 0)
    if ruleset < 0:
        return 0
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    folders = [os.path.realpath(p) for p in prefixes | set(sys.path) if p]
    folders += ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"]
    rules = [(path, read_rights) for path in folders]
    rules += [("/etc/ld.so.cache", 4), ("/etc/localtime", 4), ("/dev/urandom", 4), ("/dev/zero", 4)]
    rules += [("/dev/null", 2 | 4 | (1 << 14) | (1 << 15)), (workdir, fs_rights & ~device_nodes)]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= file_only
        rule = struct.pack("=Qi", rights & fs_rights, fd)  # struct landlock_path_beneath_attr (packed)
        syscall(libc, 445, ruleset, 1, ctypes.create_string_buffer(rule, len(rule)), 0)  # RULE_PATH_BENEATH
        os.close(fd)
    status = syscall(libc, 446, ruleset, 0)  # landlock_restrict_self
    os.close(ruleset)
    return abi if status == 0 else 0


# Classic BPF (linux/filter.h): BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K; seccomp return values.
LOAD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, ENOSYS, CLONE_THREAD = 1, 38, 0x00010000
NR, ARCH = 0, 4  # offsets in struct seccomp_data


def argument(index: int) -> int:
    """Offset of the low 32 bits of argument `index` in struct seccomp_data (little-endian). The pid and `which`
    arguments checked here are C ints, which the kernel truncates to those 32 bits as well."""
    return 16 + 8 * index


def _self_only(number: int, target: int, me: int, which: tuple[int, int] | None = None) -> list[tuple]:
    """Allow system call `number` only when its argument `target` names the caller (0 or its own pid); with
    `which` = (argument, value), that argument must also equal value (setpriority's PRIO_PROCESS, ioprio_set's
    IOPRIO_WHO_PROCESS: a process group or a user would reach other processes). Anything else: EPERM."""
    check = [(LOAD, 0, 0, argument(target)), (JEQ, 2, 0, 0), (JEQ, 1, 0, me), (RET, 0, 0, ERRNO | EPERM),
             (RET, 0, 0, ALLOW)]  # fmt: skip
    if which is not None:
        index, value = which
        check = [(LOAD, 0, 0, argument(index)), (JEQ, 0, len(check) - 2, value), *check]
    return [(JEQ, 0, len(check), number), *check]


def _deny_values(number: int, index: int, values: tuple[int, ...]) -> list[tuple]:
    """Refuse system call `number` (EPERM) when its argument `index` is one of `values`; allow it otherwise."""
    check = [(LOAD, 0, 0, argument(index))]
    check += [(JEQ, len(values) - i, 0, value) for i, value in enumerate(values)]  # to the EPERM below
    check += [(RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | EPERM)]
    return [(JEQ, 0, len(check), number), *check]


def seccomp(libc, table: dict) -> bool:
    me = os.getpid()  # the sandbox cannot exec or fork, so this stays its pid
    program = [(LOAD, 0, 0, ARCH), (JEQ, 1, 0, table["audit_arch"]), (RET, 0, 0, KILL), (LOAD, 0, 0, NR)]
    if table is _X86_64:
        program += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | EPERM)]  # the x32 syscall range
    program += [(JEQ, 0, 1, table["clone3"]), (RET, 0, 0, ERRNO | ENOSYS)]  # threads fall back to clone
    # clone: threads only
    program += [(JEQ, 0, 4, table["clone"]), (LOAD, 0, 0, argument(0)), (JSET, 0, 1, CLONE_THREAD),
                (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | EPERM)]  # fmt: skip
    for name in ("kill", "tkill", "tgkill"):  # signals: only to itself (first argument == own pid)
        program += [(JEQ, 0, 4, table[name]), (LOAD, 0, 0, argument(0)), (JEQ, 1, 0, me),
                    (RET, 0, 0, ERRNO | EPERM), (RET, 0, 0, ALLOW)]  # fmt: skip
    for name in ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr"):
        program += _self_only(table[name], 0, me)
    program += _self_only(table["setpriority"], 1, me, which=(0, 0))  # PRIO_PROCESS
    program += _self_only(table["ioprio_set"], 1, me, which=(0, 1))  # IOPRIO_WHO_PROCESS
    # A file's owner receives SIGIO (or any signal F_SETSIG names, SIGKILL included) when I/O is ready on it:
    # making the parent the owner of the stdout pipe would signal it past the kill filter above. So no
    # F_SETOWN (8), F_SETSIG (10), F_SETOWN_EX (15), nor their ioctl forms FIOSETOWN and SIOCSPGRP.
    program += _deny_values(table["fcntl"], 1, (8, 10, 15))
    program += _deny_values(table["ioctl"], 1, (0x8901, 0x8902))
    # The older calls into the same code need no check: setrlimit acts on the caller only, and nice() is
    # setpriority in the C library (x86-64 and aarch64 have no nice system call).
    for number in table["denied"].values():
        program += [(JEQ, 0, 1, number), (RET, 0, 0, ERRNO | EPERM)]
    program.append((RET, 0, 0, ALLOW))
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)  # struct sock_filter
    filters = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    return prctl(libc, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog)) == 0


def run_main_py() -> None:
    with open("main.py", encoding="utf-8") as file:
        source = file.read()
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]
    exec(compile(source, "main.py", "exec"), module.__dict__)


if __name__ == "__main__":
    main()
