"""The Python sandbox: run_python(code) runs untrusted code (HumanEval completions, the python tool) in a fresh
process. It is not a container; here is exactly what it does and what it stops.

Always (any POSIX system):
  - a fresh `python -I` process (isolated mode: no PYTHON* variables, no user site) in a new, empty temporary
    directory that is its cwd, HOME and TMPDIR, and is deleted afterwards (whatever the code left in it: folders
    without permissions are made removable first);
  - a scrubbed environment (PATH, LANG and the temp dir only): the parent's variables, secrets included, are not
    passed on; stdin is /dev/null;
  - rlimits set in the child before the untrusted code runs: CPU seconds, address space (memory), file size,
    open files, processes (0 new ones -- for a normal user that also means no threads; root ignores this limit,
    which is one reason for seccomp below), no core dumps, no real-time priority, no raised nice value, no POSIX
    message queues; soft and hard limits are equal, so the code can lower them but never raise them;
  - started as root, the child drops every capability (bounding set, ambient set, then effective, permitted and
    inheritable through capset) and sets no-new-privs before the code runs: root without capabilities cannot
    create device nodes, read the kernel log, watch the file system (fanotify), switch accounting on, chroot,
    take real-time priority or a negative nice value, raise its rlimits, or override file permissions.
On Linux, two kernel features, applied by the child to itself before the untrusted code runs. Both are
irrevocable: nothing the code does afterwards (ctypes included) can lift them.
  - Landlock (kernel >= 5.13, if enabled): writes only inside the temp dir (no device nodes even there); reads
    only of the Python installation, the system library folders (/usr, /lib*, /bin, /sbin) and the temp dir -- so
    no /proc (no listing of processes, nor the parent's environment in /proc/<pid>/environ), no home folders, no
    /etc secrets; TCP bind/connect denied (ABI >= 4); signals to processes outside the sandbox and abstract unix
    sockets denied (ABI >= 6).
  - seccomp (x86-64 and aarch64): nothing aimed at another process -- signals, prlimit, setpriority, ioprio_set,
    sched_setaffinity, sched_setscheduler, sched_setparam and sched_setattr are allowed only on the sandbox process
    itself, and ptrace, process_vm_*, pidfd_*, kcmp, process_madvise, migrate_pages and move_pages not at all, nor
    making another process the owner of a file (F_SETOWN, F_SETSIG: the owner gets a signal when I/O is ready); no
    SysV shared memory, semaphores or message queues (they outlive the process); no new processes (fork, vfork,
    clone without CLONE_THREAD; clone3 reports ENOSYS so threads fall back to clone), no exec, no sockets at all (so
    no network, TCP or UDP, even without Landlock's network rules); none of the privileged calls (mknod, syslog,
    fanotify, acct, chroot, quotactl, iopl/ioperm, open_by_handle_at, mount and the new mount API, unshare/setns,
    module loading, reboot, clock changes, swap, host names, keyrings, bpf, perf_event_open, io_uring, userfaultfd)
    -- a second wall behind the dropped capabilities; and no chmod/chown/xattr (Landlock does not cover metadata
    changes).
What it does not stop:
  - anything on a system lacking Landlock or seccomp (the `protections` field of every result says which layers
    were in force): then network access, reading the user's files (and /proc/<parent>/environ) and writing
    wherever the user can write are possible, and a root user's fork bomb is only stopped by the timeout;
  - reading files inside the allowed folders (the Python installation, /usr, ...);
  - CPU, memory-bandwidth and timing side channels, and use of the machine up to the limits given (disk space
    included: each file is bounded, their number only by the timeout);
  - kernel bugs. For hostile code at scale, use a VM or a container runtime made for it.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from picochat.common import warn

DEFAULT_TIMEOUT = 5.0  # seconds of wall clock (the reference's HumanEval setting)
DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024  # address space of the child
DEFAULT_MAX_OUTPUT_BYTES = 100_000  # per stream; more and the child is killed
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024  # largest file the child may write
DEFAULT_MAX_OPEN_FILES = 64
_PROTECTIONS_PREFIX = b"\x00picochat-sandbox "  # first line the guard writes to stderr
# The guard (picochat/sandbox_guard.py) is the first code the child runs. It is handed over as source text
# (`python -I -c`), so the child needs nothing importable and the code finds no picochat module on its path.
_GUARD_SOURCE = Path(__file__).with_name("sandbox_guard.py")


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
    guard = _GUARD_SOURCE.read_text(encoding="utf-8")
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
            [sys.executable, "-I", "-c", guard, json.dumps(settings)],
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
        remove_tree(workdir)
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


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder the sandboxed code wrote into, whatever it left there; report one that remains.

    shutil.rmtree is not enough for what hostile code can leave: folders nested thousands deep (rmtree recurses
    once per level, so it raises RecursionError, and their paths pass PATH_MAX), and folders their owner cannot
    list, enter or write (mkdir with mode 0o300 or 0o000: chmod is denied to the code, mkdir's mode is not),
    which a non-root parent cannot empty. So the tree is taken apart from the top through folder descriptors:
    each folder at the top is given back its owner's permissions, its files are deleted and its sub-folders
    moved up to the top, and then it is removed -- never more than two folders deep, two descriptors open, and
    each entry handled once. The code has exited by now (its whole process group was killed and reaped), so
    nothing changes under it.
    """
    path = os.fspath(path)
    try:
        os.chmod(path, stat.S_IRWXU)
        _take_apart(path)
        os.rmdir(path)
    except OSError:
        pass
    if os.path.lexists(path):
        warn(f"sandbox: could not remove its temporary folder {path}")


def _take_apart(path: str) -> None:
    """Empty the folder `path` (see remove_tree). Stops when a whole pass over it removes nothing."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    top = os.open(path, flags)
    moved = 0  # numbers the names of the folders moved up to the top
    try:
        while True:
            entries = list(os.scandir(top))
            removed = 0
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        os.unlink(entry.name, dir_fd=top)
                        removed += 1
                        continue
                    os.chmod(entry.name, stat.S_IRWXU, dir_fd=top)
                    folder = os.open(entry.name, flags, dir_fd=top)
                    try:
                        for inner in list(os.scandir(folder)):
                            if not inner.is_dir(follow_symlinks=False):
                                os.unlink(inner.name, dir_fd=folder)
                                continue
                            os.chmod(inner.name, stat.S_IRWXU, dir_fd=folder)  # moving a folder writes its ".."
                            moved += 1
                            while _exists(f".up{moved}", top):
                                moved += 1
                            os.rename(inner.name, f".up{moved}", src_dir_fd=folder, dst_dir_fd=top)
                    finally:
                        os.close(folder)
                    os.rmdir(entry.name, dir_fd=top)
                    removed += 1
                except OSError:
                    continue  # tried again on the next pass, unless that pass removes nothing either
            if not entries or not removed:
                return
    finally:
        os.close(top)


def _exists(name: str, folder: int) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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
