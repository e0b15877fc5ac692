"""Hostile code against the sandbox's parent and the machine: every call of issue 20 (items 1-2), each refused.

A stand-in parent (a fresh Python that plays the server started with `--tool python`) runs each snippet through
run_python. The snippets aim at that parent -- its rlimits, nice value, I/O priority, CPU affinity, scheduling
policy, its /proc entries, a signal -- or at root's privileges (device nodes, the kernel log, fanotify, process
accounting, chroot, real-time scheduling, negative nice, capabilities). Afterwards the parent must have finished
its batch (alive), with its own limits and priorities unchanged, and no sandbox temp folder may be left.

The batch runs twice: with the parent as root (the sandbox then drops every capability) and as an unprivileged
user (nobody, through subprocess's user= and group=, which needs root to set up; as a non-root user the second
variant runs as that user instead). Snippets never aim at pid 1 or at anything outside the stand-in parent, so a
regression kills only the stand-in.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

# Each body raises OSError or ValueError when the sandbox refuses it. `parent` is the stand-in's pid; check()
# turns a C library -1 into OSError; syscall() makes a raw call by name (no Python or glibc wrapper exists).
SNIPPETS = {
    # item 1: the parent's resources and scheduling
    "prlimit_parent_cpu": "resource.prlimit(parent, resource.RLIMIT_CPU, (1, 1))",
    "prlimit_parent_nofile": "resource.prlimit(parent, resource.RLIMIT_NOFILE, (3, 3))",
    "prlimit_parent_read": "resource.prlimit(parent, resource.RLIMIT_NOFILE)",
    "raise_own_cpu_limit": "resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY,) * 2)",
    "setpriority_parent": "os.setpriority(os.PRIO_PROCESS, parent, 19)",
    "setpriority_parent_group": "os.setpriority(os.PRIO_PGRP, os.getpgid(parent), 19)",
    "setpriority_own_user": "os.setpriority(os.PRIO_USER, 0, 19)",
    "ioprio_parent": "syscall('ioprio_set', 1, parent, 3 << 13)",  # IOPRIO_WHO_PROCESS, class idle
    "ioprio_own_user": "syscall('ioprio_set', 3, 0, 3 << 13)",  # IOPRIO_WHO_USER
    "sched_setaffinity_parent": "os.sched_setaffinity(parent, {0})",
    "sched_setscheduler_parent": "os.sched_setscheduler(parent, os.SCHED_IDLE, os.sched_param(0))",
    "sched_setparam_parent": "os.sched_setparam(parent, os.sched_param(0))",
    # struct sched_attr: size 48, policy SCHED_IDLE (5), then flags, nice, priority, runtime, deadline, period
    "sched_setattr_parent": "syscall('sched_setattr', parent, ctypes.create_string_buffer("
    "struct.pack('=IIQiIQQQ', 48, 5, 0, 0, 0, 0, 0, 0), 48), 0)",
    "kill_parent": "os.kill(parent, signal.SIGKILL)",
    # the owner of a file is signalled when I/O is ready on it: the stdout pipe could signal the parent
    "fcntl_setown_parent": "fcntl.fcntl(1, fcntl.F_SETOWN, parent)",
    "fcntl_setown_ex_parent": "fcntl.fcntl(1, 15, struct.pack('ii', 1, parent))",  # F_SETOWN_EX, F_OWNER_TID
    "fcntl_setsig_kill": "fcntl.fcntl(1, 10, signal.SIGKILL)",  # F_SETSIG
    "ioctl_fiosetown_parent": "fcntl.ioctl(1, 0x8901, struct.pack('i', parent))",
    "sysv_shared_memory": "check(libc.shmget(0, 1 << 20, 0o1600))",  # IPC_PRIVATE, IPC_CREAT | 0600
    "list_processes": "os.listdir('/proc')",
    "parent_status": "open(f'/proc/{parent}/status').read()",
    "parent_environ": "open(f'/proc/{parent}/environ', 'rb').read()",
    # item 2: privileged calls (as root: refused because every capability is gone, and by seccomp)
    "mknod_kmsg": "os.mknod('kmsg', stat.S_IFCHR | 0o600, os.makedev(1, 11))",
    "mknod_disk": "os.mknod('disk', stat.S_IFBLK | 0o600, os.makedev(8, 0))",
    "klogctl_read_all": "check(libc.klogctl(3, ctypes.create_string_buffer(4096), 4096))",
    "klogctl_size": "check(libc.klogctl(10, None, 0))",
    "fanotify_init": "check(libc.fanotify_init(0, 0))",
    # FAN_MARK_ADD | FAN_MARK_MOUNT on "/" for FAN_OPEN, through the group fd fanotify_init would have given
    "fanotify_mark_root": "check(libc.fanotify_mark(0, 0x11, ctypes.c_uint64(0x20), -100, b'/'))",
    "acct": "check(libc.acct(b'accounting.log'))",
    "chroot": "os.chroot('.')",
    "sched_fifo_self": "os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))",
    "negative_nice": "os.nice(-20)",
    "ioprio_realtime_self": "syscall('ioprio_set', 1, 0, 1 << 13)",  # class RT needs CAP_SYS_ADMIN
    "capset_all": "syscall('capset', ctypes.create_string_buffer(struct.pack('=Ii', 0x20080522, 0), 8), "
    "ctypes.create_string_buffer(b'\\xff' * 24, 24))",
    "open_by_handle_at": "syscall('open_by_handle_at', -100, ctypes.create_string_buffer(16), 0)",
    "unshare_user_namespace": "check(libc.unshare(0x10000000))",
}

PRELUDE = """\
import ctypes, errno, fcntl, os, platform, resource, signal, stat, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NUMBERS = {"x86_64": dict(ioprio_set=251, sched_setattr=314, open_by_handle_at=304, capset=126),
           "aarch64": dict(ioprio_set=30, sched_setattr=274, open_by_handle_at=265, capset=91)}[platform.machine()]
parent = os.getppid()
def check(result):
    if result == -1:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result
def syscall(name, *args):
    words = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return check(libc.syscall(ctypes.c_long(NUMBERS[name]), *words))
"""

# Not refused, but hostile to the cleanup: folders the parent cannot list or write into (chmod is denied, mkdir's
# mode is not), folders nested deeper than rmtree's recursion and PATH_MAX allow, names the cleanup itself uses,
# then limits of its own lowered so far that it can open no more files.
LEAVE_A_MESS = """\
import os, resource
os.umask(0)
os.mkdir('.up1')
open('.up1/file', 'w').write('x')
for level in range(1200):
    os.mkdir('deep', 0o300 if level % 5 == 0 else 0o700)
    os.chdir('deep')
os.chdir(os.environ['HOME'])
os.makedirs('a/b/c')
open('a/b/c/file', 'w').write('x')
os.mkdir('unlistable', 0o300)
open('unlistable/file', 'w').write('x')
os.mkdir('unlistable/deeper', 0o300)
open('unlistable/deeper/file', 'w').write('x')
os.mkdir('unenterable', 0o000)
print('done', flush=True)
resource.setrlimit(resource.RLIMIT_NOFILE, (3, 3))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
"""

# What the code holds: effective, permitted and inheritable capabilities (capget), and the bounding set's size.
CAPABILITIES_HELD = (
    PRELUDE
    + """\
NUMBERS["capget"] = {"x86_64": 125, "aarch64": 90}[platform.machine()]
data = ctypes.create_string_buffer(24)
syscall("capget", ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8), data)
words = struct.unpack("=6I", data.raw)
bounding = sum(1 for cap in range(64) if libc.prctl(23, ctypes.c_ulong(cap), 0, 0, 0) == 1)
print("effective", words[0] | words[3], "permitted", words[1] | words[4], "inheritable", words[2] | words[5],
      "bounding", bounding)
"""
)

# The stand-in parent: runs every snippet, reports what each printed and its own state before and after.
PARENT = """\
import ctypes, glob, json, os, platform, resource, sys, tempfile
from picochat.sandbox import run_python

libc = ctypes.CDLL(None, use_errno=True)
IOPRIO_GET = {"x86_64": 252, "aarch64": 31}[platform.machine()]

def state():
    return {"cpu": resource.getrlimit(resource.RLIMIT_CPU), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "nice": os.getpriority(os.PRIO_PROCESS, 0), "affinity": sorted(os.sched_getaffinity(0)),
            "policy": os.sched_getscheduler(0), "ioprio": libc.syscall(IOPRIO_GET, 1, 0)}

before = state()
snippets = json.loads(sys.argv[1])
results = {}
for name, code in snippets.items():
    result = run_python(code)
    results[name] = {"stdout": result.stdout, "error": result.error, "protections": result.protections}
leftovers = glob.glob(os.path.join(tempfile.gettempdir(), "picochat-sandbox-*"))
print(json.dumps({"results": results, "before": before, "after": state(), "leftovers": leftovers,
                  "uid": os.getuid()}))
"""


def _programs() -> dict[str, str]:
    programs = {}
    for name, body in SNIPPETS.items():
        programs[name] = (
            PRELUDE
            + "try:\n"
            + textwrap.indent(body, "    ")
            + "\nexcept (OSError, ValueError) as error:\n"
            + "    print('refused', errno.errorcode.get(getattr(error, 'errno', None) or 0, type(error).__name__))\n"
            + "else:\n    print('allowed')\n"
        )
    programs["leave_a_mess"] = LEAVE_A_MESS
    programs["capabilities_held"] = CAPABILITIES_HELD
    return programs


def _unprivileged_account() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interpreter_for(user: tuple[int, int] | None) -> tuple[str, dict] | None:
    """A Python that `user` can run and that imports picochat.sandbox, with the environment it needs.

    This one first; else the system's python3 with the repository on PYTHONPATH (picochat.sandbox needs only the
    standard library): a virtual environment whose base interpreter lives in root's home cannot be run by
    another user. None when neither works."""
    if user is None:
        return sys.executable, {}
    extra = {"user": user[0], "group": user[1], "extra_groups": []}
    candidates = [(sys.executable, {}), (shutil.which("python3", path="/usr/bin:/bin"), {"PYTHONPATH": REPOSITORY})]
    for interpreter, variables in candidates:
        if interpreter is None:
            continue
        try:
            probe = subprocess.run([interpreter, "-c", "import picochat.sandbox"], env={**os.environ, **variables},
                                   cwd="/", capture_output=True, timeout=60, **extra)  # fmt: skip
        except OSError:
            continue
        if probe.returncode == 0:
            return interpreter, variables
    return None


@pytest.fixture(scope="module", params=["root", "unprivileged"])
def batch(request):
    """Run every snippet from a stand-in parent of the variant's kind; returns its report and exit status."""
    as_root = os.geteuid() == 0
    user = None
    if request.param == "root" and not as_root:
        pytest.skip("the root variant needs the tests to run as root")
    if request.param == "unprivileged" and as_root:
        user = _unprivileged_account()
        if user is None:
            pytest.skip("no unprivileged account (nobody) on this machine to run the parent as")
    found = _interpreter_for(user)
    if found is None:
        pytest.skip(f"no Python here that uid {user[0]} may run and that imports picochat.sandbox")
    interpreter, variables = found
    folder = tempfile.mkdtemp(prefix="picochat-hostile-")  # the stand-in's TMPDIR, where sandboxes are made
    try:
        if user is not None:
            os.chmod(folder, 0o755)
            os.chown(folder, *user)
        environment = {**os.environ, **variables, "TMPDIR": folder, "HOME": folder}
        extra = {"user": user[0], "group": user[1], "extra_groups": []} if user is not None else {}
        process = subprocess.run(
            [interpreter, "-c", PARENT, json.dumps(_programs())],
            env=environment, cwd=folder, capture_output=True, text=True, timeout=120, **extra,
        )  # fmt: skip
        report = json.loads(process.stdout.splitlines()[-1]) if process.returncode == 0 else None
        yield {"process": process, "report": report, "variant": request.param, "user": user}
        assert os.listdir(folder) == [], "a sandbox left its temp folder behind"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _report(batch) -> dict:
    process = batch["process"]
    assert process.returncode == 0, f"the parent died (exit {process.returncode}): {process.stderr[-2000:]}"
    return batch["report"]


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_hostile_call_is_refused(batch, name):
    result = _report(batch)["results"][name]
    assert result["stdout"].startswith("refused"), f"{name}: {result}"


def test_every_layer_was_in_force(batch):
    report = _report(batch)
    for name, result in report["results"].items():
        protections = result["protections"]
        assert protections.get("capabilities") is True, f"{name}: capabilities not dropped: {protections}"
        assert protections.get("seccomp") is True and protections.get("landlock", 0) >= 6, f"{name}: {protections}"
    if batch["user"] is not None:
        assert report["uid"] == batch["user"][0]  # the variant really ran unprivileged
    held = report["results"]["capabilities_held"]["stdout"].split()
    assert held[:6] == ["effective", "0", "permitted", "0", "inheritable", "0"], held
    if report["uid"] == 0:
        assert held[6:] == ["bounding", "0"], held  # root: the bounding set is empty too


def test_parent_is_alive_and_unchanged(batch):
    report = _report(batch)
    assert report["after"] == report["before"]  # limits, nice, I/O priority, affinity, policy: untouched
    assert report["results"]["leave_a_mess"]["stdout"] == "done\n"


def test_no_temp_folder_is_left(batch):
    assert _report(batch)["leftovers"] == []
