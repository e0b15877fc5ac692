"""The model's tools: a calculator and a Python sandbox.

calculator(expression) answers what a small model asks for in <|python_start|> ... <|python_end|>: arithmetic
(GSM8K) and letter counting ("strawberry".count("r")). It parses the expression with `ast` and evaluates a
whitelist of node types itself -- no eval(), no signals (so it works from any thread), bounded input length,
bounded number size, bounded tree size.

run_python(code) runs untrusted code (HumanEval completions, the python tool) in a fresh process. It is not a
container; here is exactly what it does and what it stops.

Always (any POSIX system):
  - a fresh `python -I` process (isolated mode: no PYTHON* variables, no user site) in a new, empty temporary
    directory that is its cwd, HOME and TMPDIR, and is deleted afterwards;
  - a scrubbed environment (PATH, LANG and the temp dir only): the parent's variables, secrets included, are not
    passed on; stdin is /dev/null;
  - rlimits set in the child before the untrusted code runs: CPU seconds, address space (memory), file size,
    open files, processes (0 new ones -- for a normal user that also means no threads; root ignores this limit,
    which is one reason for seccomp below), no core dumps;
  - a wall-clock timeout after which the whole process group is SIGKILLed; stdout and stderr are read by the
    parent as they come and capped: past the cap the child is killed, so printing 1 GB costs nothing.
On Linux, two kernel features, applied by the child to itself before the untrusted code runs. Both are
irrevocable: nothing the code does afterwards (ctypes included) can lift them.
  - Landlock (kernel >= 5.13, if enabled): writes only inside the temp dir; reads only of the Python installation,
    the system library folders (/usr, /lib*, /bin, /sbin) and the temp dir -- so no /proc (the parent's
    environment in /proc/<pid>/environ), no home folders, no /etc secrets; TCP bind/connect denied (ABI >= 4);
    signals to processes outside the sandbox and abstract unix sockets denied (ABI >= 6).
  - seccomp (x86-64 and aarch64): no new processes (fork, vfork, clone without CLONE_THREAD; clone3 reports
    ENOSYS so threads fall back to clone), no exec, no sockets at all (so no network, TCP or UDP, even without
    Landlock's network rules), no signals except to itself, and no ptrace, process_vm_*, io_uring, bpf,
    perf_event_open, keyrings, mount/unshare/setns, module loading, reboot, clock changes, chmod/chown/xattr
    (Landlock does not cover metadata changes, and as root they would reach any file).
What it does not stop:
  - anything on a system lacking Landlock or seccomp (the `protections` field of every result says which layers
    were in force): then network access, reading the user's files (and /proc/<parent>/environ) and writing
    wherever the user can write are possible, and a root user's fork bomb is only stopped by the timeout;
  - reading files inside the allowed folders (the Python installation, /usr, ...);
  - CPU, memory-bandwidth and timing side channels, and use of the machine up to the limits given;
  - kernel bugs. For hostile code at scale, use a VM or a container runtime made for it.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------------------
# Calculator

MAX_EXPRESSION_CHARS = 1000
MAX_NODES = 200  # AST nodes: bounds the work and the recursion depth of the evaluator
MAX_MAGNITUDE = 1e30  # every intermediate value stays within +-1e30 (Python ints could otherwise grow without end)

_BINARY_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
# Models (and people) write 1,234,567 and ×, ÷, − ; translate those to Python before parsing.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_UNICODE_OPERATORS = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-"})


class _Rejected(Exception):
    """The expression is outside the whitelist or its bounds."""


def calculator(expression: str) -> str | None:
    """Evaluate arithmetic or a letter count; return the result as text, or None when the expression is not
    something the calculator does (or fails: division by zero, too large, too long).

    Allowed: int and float literals, + - * / // %, parentheses, unary minus/plus, and `"literal".count("x")`.
    Integral results print without ".0" (5, not 5.0), others with up to 10 significant digits.
    """
    if not isinstance(expression, str):
        return None
    expression = expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    if '"' not in expression and "'" not in expression:
        expression = _THOUSANDS_COMMA.sub("", expression).translate(_UNICODE_OPERATORS)
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        return None
    try:
        value = _evaluate(tree.body)
    except (_Rejected, ArithmeticError, ValueError, TypeError):
        return None
    return _format_number(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _bounded(_BINARY_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.func.value.value.count(node.args[0].value)
    raise _Rejected(type(node).__name__)


def _bounded(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected("not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise _Rejected("too large")
    return value


def _format_number(value: int | float) -> str:
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# Python sandbox

DEFAULT_TIMEOUT = 5.0  # seconds of wall clock (the reference's HumanEval setting)
DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024  # address space of the child
DEFAULT_MAX_OUTPUT_BYTES = 100_000  # per stream; more and the child is killed
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024  # largest file the child may write
DEFAULT_MAX_OPEN_FILES = 64
_PROTECTIONS_PREFIX = b"\x00picochat-sandbox "  # first line the child's guard writes to stderr


@dataclass
class ExecutionResult:
    success: bool  # exited with status 0, in time, within the output cap
    stdout: str
    stderr: str
    error: str | None  # one line: the exception, the timeout or the limit that was hit
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    returncode: int | None = None
    protections: dict = field(default_factory=dict)  # which kernel layers were in force (see the module doc)


def run_python(
    code: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox described at the top of this module.

    Thread-safe (no signals, no preexec_fn), so evaluators may run many at once from a thread pool.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be a str, got {type(code).__name__}")
    workdir = tempfile.mkdtemp(prefix="picochat-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as file:
            file.write(code)
        settings = {
            "workdir": workdir,
            "cpu_seconds": max(1, math.ceil(timeout) + 1),
            "memory_bytes": max_memory_bytes,
            "file_bytes": max_file_bytes,
            "open_files": DEFAULT_MAX_OPEN_FILES,
        }
        environment = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": workdir,
            "TMPDIR": workdir,
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",
        }
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD, json.dumps(settings)],
            cwd=workdir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
            close_fds=True,
        )
        stdout, stderr, timed_out, truncated = _collect_output(process, timeout, max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    protections, stderr = _split_protections(stderr)
    stdout_text = stdout.decode("utf-8", errors="replace")
    stderr_text = stderr.decode("utf-8", errors="replace")
    returncode = process.returncode
    memory_exceeded = "MemoryError" in stderr_text
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif truncated:
        error = f"output exceeded {max_output_bytes} bytes"
    elif returncode is not None and returncode < 0:
        error = f"killed by signal {_signal_name(-returncode)}"
    elif returncode != 0:
        lines = [line for line in stderr_text.splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit status {returncode}"
    else:
        error = None
    return ExecutionResult(
        success=returncode == 0 and not timed_out and not truncated,
        stdout=stdout_text,
        stderr=stderr_text,
        error=error,
        timed_out=timed_out,
        memory_exceeded=memory_exceeded,
        output_truncated=truncated,
        returncode=returncode,
        protections=protections,
    )


def python_tool(code: str) -> str | None:
    """The python tool for the engine: what the code printed (or its error), cropped to 500 characters."""
    result = run_python(code)
    text = result.stdout.strip() if result.success else (result.error or "error")
    return text[:500]


def _collect_output(process: subprocess.Popen, timeout: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until the child exits; kill its process group on timeout or past `cap` bytes
    on either stream. Returns (stdout, stderr, timed_out, truncated)."""
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    timed_out = truncated = False
    try:
        while selector.get_map() and not truncated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:  # end of stream
                    selector.unregister(key.fileobj)
                    continue
                buffers[key.fileobj] += chunk
                truncated = truncated or len(buffers[key.fileobj]) > cap
        if not (timed_out or truncated):
            # Both streams are closed; the child may still be running (it can close them itself).
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        selector.close()
        if process.poll() is None:
            _kill_group(process)
        process.wait()
        for stream in buffers:
            stream.close()
    return bytes(buffers[process.stdout][:cap]), bytes(buffers[process.stderr][:cap]), timed_out, truncated


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:  # the group may be gone already while the leader is still a zombie to reap
        process.kill()
    except ProcessLookupError:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name  # e.g. SIGXCPU (CPU limit), SIGXFSZ (file size limit)
    except ValueError:
        return str(number)


def _split_protections(stderr: bytes) -> tuple[dict, bytes]:
    if not stderr.startswith(_PROTECTIONS_PREFIX):
        return {}, stderr  # the guard did not get that far (e.g. killed at once)
    line, _, rest = stderr.partition(b"\n")
    try:
        return json.loads(line[len(_PROTECTIONS_PREFIX) :]), rest
    except ValueError:
        return {}, rest


# ----------------------------------------------------------------------------------------------------------
# The guard: the first code the child runs (`python -I -c _GUARD settings.json`). It limits the process with
# rlimits, Landlock and seccomp, reports which layers took effect on its first stderr line, then runs main.py in a
# fresh __main__ module (so the guard's own names are not visible to the code). It is plain source text because it
# runs in the child; its constants are the kernel's ABI (linux/landlock.h, linux/seccomp.h, linux/filter.h, and
# the syscall tables of x86-64 and asm-generic/unistd.h for aarch64).

_GUARD = r"""
import ctypes, json, os, platform, resource, struct, sys, types

settings = json.loads(sys.argv[1])
workdir = settings["workdir"]
protections = {"rlimits": True, "landlock": 0, "seccomp": False}

def set_limit(kind, value):
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        protections["rlimits"] = False

set_limit(resource.RLIMIT_CPU, settings["cpu_seconds"])
set_limit(resource.RLIMIT_AS, settings["memory_bytes"])
set_limit(resource.RLIMIT_FSIZE, settings["file_bytes"])
set_limit(resource.RLIMIT_NOFILE, settings["open_files"])
set_limit(resource.RLIMIT_NPROC, 0)
set_limit(resource.RLIMIT_CORE, 0)

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def syscall(number, *args):  # every argument passed as a full machine word (the calls are variadic)
    return libc.syscall(ctypes.c_long(number), *[a if isinstance(a, ctypes.Array) else ctypes.c_long(a)
                                                 for a in args])

libc.prctl(ctypes.c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
# ^ PR_SET_NO_NEW_PRIVS: required for unprivileged Landlock and seccomp

def landlock():
    abi = syscall(444, 0, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
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
    if abi >= 6:
        attr, size = struct.pack("=QQQ", fs_rights, 3, 3), 24  # TCP bind+connect; scope: abstract sockets, signals
    elif abi >= 4:
        attr, size = struct.pack("=QQ", fs_rights, 3), 16
    else:
        attr, size = struct.pack("=Q", fs_rights), 8
    ruleset = syscall(444, ctypes.create_string_buffer(attr, size), size, 0)
    if ruleset < 0:
        return 0
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    folders = [os.path.realpath(p) for p in prefixes | set(sys.path) if p]
    folders += ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"]
    rules = [(path, read_rights) for path in folders]
    rules += [("/etc/ld.so.cache", 4), ("/etc/localtime", 4), ("/dev/urandom", 4), ("/dev/zero", 4)]
    rules += [("/dev/null", 2 | 4 | (1 << 14) | (1 << 15)), (workdir, fs_rights)]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            rights &= file_only
        rule = struct.pack("=Qi", rights & fs_rights, fd)  # struct landlock_path_beneath_attr (packed)
        syscall(445, ruleset, 1, ctypes.create_string_buffer(rule, len(rule)), 0)  # RULE_PATH_BENEATH
        os.close(fd)
    status = syscall(446, ruleset, 0)  # landlock_restrict_self
    os.close(ruleset)
    return abi if status == 0 else 0

def seccomp():
    machine = platform.machine()
    if machine == "x86_64":
        arch, table = 0xC000003E, dict(
            fork=57, vfork=58, clone=56, clone3=435, execve=59, execveat=322, socket=41, socketpair=53,
            kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_open=434,
            pidfd_send_signal=424, ptrace=101, process_vm_readv=310, process_vm_writev=311, io_uring_setup=425,
            bpf=321, perf_event_open=298, userfaultfd=323, keyctl=250, add_key=248, request_key=249, mount=165,
            umount2=166, pivot_root=155, unshare=272, setns=308, init_module=175, finit_module=313,
            delete_module=176, kexec_load=246, reboot=169, swapon=167, swapoff=168, sethostname=170,
            setdomainname=171, settimeofday=164, clock_settime=227, adjtimex=159, chmod=90, fchmod=91,
            fchmodat=268, fchmodat2=452, chown=92, fchown=93, lchown=94, fchownat=260, setxattr=188,
            lsetxattr=189, fsetxattr=190, removexattr=197, lremovexattr=198, fremovexattr=199)
    elif machine in ("aarch64", "arm64"):
        arch, table = 0xC00000B7, dict(
            clone=220, clone3=435, execve=221, execveat=281, socket=198, socketpair=199, kill=129, tkill=130,
            tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, pidfd_open=434, pidfd_send_signal=424,
            ptrace=117, process_vm_readv=270, process_vm_writev=271, io_uring_setup=425, bpf=280,
            perf_event_open=241, userfaultfd=282, keyctl=219, add_key=217, request_key=218, mount=40, umount2=39,
            pivot_root=41, unshare=97, setns=268, init_module=105, finit_module=273, delete_module=106,
            kexec_load=104, reboot=142, swapon=224, swapoff=225, sethostname=161, setdomainname=162,
            settimeofday=170, clock_settime=112, adjtimex=171, fchmod=52, fchmodat=53, fchmodat2=452,
            fchown=55, fchownat=54, setxattr=5, lsetxattr=6, fsetxattr=7, removexattr=14, lremovexattr=15,
            fremovexattr=16)
    else:
        return False
    LOAD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    def error(number):
        return 0x00050000 | number  # SECCOMP_RET_ERRNO
    EPERM, ENOSYS, CLONE_THREAD, me = 1, 38, 0x00010000, os.getpid()
    program = [(LOAD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LOAD, 0, 0, 0)]  # wrong arch: kill
    if machine == "x86_64":
        program += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, error(EPERM))]  # the x32 syscall range
    program += [(JEQ, 0, 1, table.pop("clone3")), (RET, 0, 0, error(ENOSYS))]  # threads fall back to clone
    program += [(JEQ, 0, 4, table.pop("clone")), (LOAD, 0, 0, 16), (JSET, 0, 1, CLONE_THREAD),
                (RET, 0, 0, ALLOW), (RET, 0, 0, error(EPERM))]  # clone: threads only
    for name in ("kill", "tkill", "tgkill"):  # signals: only to itself (first argument == own pid)
        program += [(JEQ, 0, 4, table.pop(name)), (LOAD, 0, 0, 16), (JEQ, 1, 0, me),
                    (RET, 0, 0, error(EPERM)), (RET, 0, 0, ALLOW)]
    for number in table.values():
        program += [(JEQ, 0, 1, number), (RET, 0, 0, error(EPERM))]
    program.append((RET, 0, 0, ALLOW))
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)  # struct sock_filter
    filters = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.addressof(filters))
    status = libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0),
                        ctypes.c_ulong(0))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return status == 0

if sys.platform == "linux":
    protections["landlock"] = landlock()
    protections["seccomp"] = seccomp()
sys.stderr.write("\x00picochat-sandbox " + json.dumps(protections) + "\n")
sys.stderr.flush()

with open("main.py", encoding="utf-8") as file:
    source = file.read()
module = types.ModuleType("__main__")
module.__file__ = "main.py"
sys.modules["__main__"] = module
sys.argv = ["main.py"]
exec(compile(source, "main.py", "exec"), module.__dict__)
"""


def tool_named(name: str):
    """The tool for a --tool value: "calculator", "python" (the sandbox) or "none" (None: tool calls are not run)."""
    return {"calculator": calculator, "python": python_tool, "none": None}[name]
