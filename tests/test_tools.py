"""Tools: the AST calculator and the Python sandbox (the reference's adversarial list plus fork bomb, 1 GB of
output, network, the parent's secrets, writes outside the temp dir, infinite loop).

The sandbox tests assert the protections this machine gives (Linux with Landlock and seccomp); on a machine
without them the first test fails and says which layer is missing, rather than running the dangerous ones."""

from __future__ import annotations

import builtins
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from picochat.tools import calculator, python_tool, run_python

# ---- calculator ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2+3", "5"),
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("-5 + 2", "-3"),
        ("--5", "5"),
        ("+7", "7"),
        ("10 / 4", "2.5"),
        ("10 / 2", "5"),  # integral results print without ".0"
        ("7 // 2", "3"),
        ("7 % 3", "1"),
        ("1 / 3", "0.3333333333"),
        ("0.1 + 0.2", "0.3"),
        ("1,234 * 2", "2468"),  # thousands separators
        ("12 × 3 − 4 ÷ 2", "34"),  # the symbols people write
        ("1e3 + 1", "1001"),
        ('"strawberry".count("r")', "3"),
        ("'banana'.count('an')", "2"),
        ('"a,b,c".count(",")', "2"),  # commas inside strings are left alone
    ],
)
def test_calculator_evaluates_the_whitelist(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('echo hi')",
        "open('/etc/passwd').read()",
        "x + 1",
        "2 ** 10",  # power: unbounded work, not in the whitelist
        "(1).__class__",
        "'abc'.upper()",
        "'abc'.count(x)",
        "'abc'.count('a', 1)",
        "len('abc')",
        "[1, 2][0]",
        "lambda: 1",
        "1 if True else 2",
        "1 < 2",
        "'a' + 'b'",
        "'a' * 3",
        "1 / 0",
        "5 // 0",
        "5 % 0",
        "9" * 40,  # larger than the magnitude bound
        "99999999999 * 99999999999 * 99999999999",  # grows past the bound
        "1e308 * 10",  # overflows to inf
        "1 +" * 300 + "1",  # longer than the length bound
        "+".join(["1"] * 150),  # too many nodes
        "",
        "   ",
        "2 +",
        "import os",
    ],
)
def test_calculator_rejects_everything_else(expression):
    assert calculator(expression) is None


def test_calculator_never_evaluates_python(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert calculator("6 * 7") == "42"
    assert calculator(12) is None  # not a string


def test_calculator_works_from_any_thread():
    # The reference's calculator used SIGALRM, which only works on the main thread.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(calculator, [f"{i} * 3" for i in range(40)]))
    assert results == [str(i * 3) for i in range(40)]


# ---- sandbox: the protections and the ordinary cases -----------------------------------------------------


def test_sandbox_protections_are_in_force():
    result = run_python("print('ok')")
    assert result.success and result.stdout == "ok\n"
    assert result.protections.get("rlimits") is True
    assert result.protections.get("capabilities") is True, f"capabilities not dropped: {result.protections}"
    assert result.protections.get("seccomp") is True, f"seccomp filter not applied: {result.protections}"
    assert result.protections.get("landlock", 0) >= 6, f"Landlock ABI >= 6 needed: {result.protections}"


def test_happy_path_and_standard_library():
    code = (
        "import math, json, collections, itertools, functools, re, heapq, random, hashlib, decimal, fractions\n"
        "print(math.factorial(10), json.dumps({'a': 1}), hashlib.sha256(b'x').hexdigest()[:8])\n"
    )
    result = run_python(code)
    assert result.success, result.stderr
    assert result.stdout == '3628800 {"a": 1} 2d711642\n'
    assert result.error is None and result.returncode == 0


def test_exception_is_reported():
    result = run_python("x = 1\nprint('before')\n1 / 0\n")
    assert not result.success
    assert result.stdout == "before\n"
    assert result.error == "ZeroDivisionError: division by zero"
    assert 'File "main.py", line 3' in result.stderr  # tracebacks point at the user's code


def test_input_fails_without_stdin():
    result = run_python("input()")
    assert not result.success and result.error.startswith("EOFError")


def test_tricky_quoting_survives():
    code = 'print("a\\\\b", \'{"x": [1]}\', """triple\n""", r"\\n", f"{1+1}")'
    result = run_python(code)
    assert result.success, result.stderr
    assert result.stdout == 'a\\b {"x": [1]} triple\n \\n 2\n'


def test_user_code_does_not_see_the_guard():
    result = run_python("print(sorted(k for k in globals() if not k.startswith('__')), __name__)")
    assert result.stdout == "[] __main__\n"


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('PICOCHAT_TEST_SECRET'))")
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines()[-1] == "None"


def test_python_tool_returns_output_or_error():
    assert python_tool("print(6 * 7)") == "42"
    assert python_tool("raise ValueError('nope')") == "ValueError: nope"


def test_runs_from_threads():
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * 2)").stdout, range(3)))
    assert results == ["0\n", "2\n", "4\n"]


# ---- sandbox: adversarial code, each contained within its limit ------------------------------------------


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.success
    assert result.error == "timed out after 1 s"
    assert elapsed < 3.0


def test_memory_limit():
    result = run_python("x = bytearray(1024 ** 3)\nprint('allocated')", max_memory_bytes=256 * 1024**2)
    assert not result.success and result.memory_exceeded
    assert "allocated" not in result.stdout


def test_gigabyte_of_output_is_capped():
    start = time.monotonic()
    code = "import sys\nchunk = 'x' * 1_000_000\nfor _ in range(1000):\n    sys.stdout.write(chunk)\n"
    result = run_python(code, max_output_bytes=100_000, timeout=10)
    assert result.output_truncated and not result.success
    assert len(result.stdout) == 100_000
    assert time.monotonic() - start < 5.0


def test_file_size_limit():
    code = "with open('big', 'wb') as f:\n    f.write(b'0' * (8 * 1024 * 1024))\n"
    result = run_python(code, max_file_bytes=1024 * 1024)
    assert not result.success
    assert "SIGXFSZ" in result.error or "File too large" in result.error


def test_fork_and_fork_bomb_are_contained():
    # First a single fork: if this were not blocked, the bomb below must not run.
    single = run_python("import os\nos.fork()\nprint('forked')")
    assert "forked" not in single.stdout and "PermissionError" in single.error
    start = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(bomb, timeout=1.0)
    assert result.timed_out and time.monotonic() - start < 3.0
    # No stray processes survive it: nothing else in the sandbox's session.
    assert subprocess.run(["pgrep", "-f", "picochat-sandbox"], capture_output=True).stdout == b""


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.system('echo escaped')",  # os.system reports the failure as a status, no exception
        "import subprocess\nsubprocess.Popen(['echo', 'escaped'])",
        "import os\nos.execv('/bin/echo', ['echo', 'escaped'])",
        "import ctypes\nprint('escaped' if ctypes.CDLL(None).fork() >= 0 else 'blocked')",  # past Python: no
    ],
)
def test_no_new_processes(code):
    result = run_python(code)
    assert "escaped" not in result.stdout
    assert result.returncode is not None and result.returncode >= 0  # the sandbox itself was not killed


def test_network_connect_to_localhost_is_blocked():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        result = run_python(code)
        assert not result.success and "connected" not in result.stdout
        assert "PermissionError" in result.error
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever connected
        udp = run_python("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)")
        assert "PermissionError" in udp.error  # no sockets at all, not only TCP
    finally:
        server.close()


def test_parent_environment_secrets_are_unreachable(tmp_path):
    # The secret must be in the parent's *initial* environment, where /proc/<pid>/environ shows it: so the parent
    # here is a fresh Python started with it.
    code = (
        "import os, glob\n"
        "print('env', os.environ.get('PICOCHAT_TEST_SECRET'))\n"
        "for path in [f'/proc/{os.getppid()}/environ'] + glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except OSError as error:\n"
        "        print(path, type(error).__name__)\n"
    )
    script = (
        "import json, sys\nfrom picochat.tools import run_python\n"
        f"result = run_python({code!r})\nprint(json.dumps([result.stdout, result.stderr]))"
    )
    environment = {**os.environ, "PICOCHAT_TEST_SECRET": "hunter2-secret"}
    parent = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert parent.returncode == 0, parent.stderr
    stdout, stderr = json.loads(parent.stdout.splitlines()[-1])
    assert "env None" in stdout
    assert "hunter2-secret" not in stdout and "hunter2-secret" not in stderr
    assert "PermissionError" in stdout  # /proc is off limits


def test_writes_outside_the_temp_dir_fail(tmp_path, monkeypatch):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("intact")
    monkeypatch.chdir(tmp_path)
    code = (
        "import os, shutil, tempfile\n"
        "open('inside.txt', 'w').write('fine')\n"  # the sandbox's own folder: allowed
        "print('inside', os.path.exists('inside.txt'))\n"
        f"for action in [lambda: open({str(canary / 'new.txt')!r}, 'w'),\n"
        f"               lambda: open({str(canary / 'keep.txt')!r}, 'a'),\n"
        f"               lambda: os.remove({str(canary / 'keep.txt')!r}),\n"
        f"               lambda: shutil.rmtree({str(canary)!r}),\n"
        f"               lambda: os.chmod({str(canary / 'keep.txt')!r}, 0o777),\n"
        f"               lambda: open({str(tmp_path / 'in_parent_cwd.txt')!r}, 'w'),\n"
        "               lambda: open('/tmp/picochat-escape.txt', 'w')]:\n"
        "    try:\n"
        "        action()\n"
        "        print('escaped')\n"
        "    except OSError as error:\n"
        "        print(type(error).__name__)\n"
    )
    result = run_python(code)
    assert result.success, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "inside True"
    assert lines[1:] == ["PermissionError"] * 7
    assert sorted(p.name for p in canary.iterdir()) == ["keep.txt"]
    assert (canary / "keep.txt").read_text() == "intact"
    assert oct((canary / "keep.txt").stat().st_mode & 0o777) != "0o777"
    assert not (tmp_path / "in_parent_cwd.txt").exists() and not os.path.exists("/tmp/picochat-escape.txt")
    assert not (tmp_path / "inside.txt").exists()  # relative paths resolve in the sandbox's folder


def test_signals_to_other_processes_are_blocked():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = (
            "import os, signal\n"
            f"for pid in ({victim.pid}, os.getppid(), 1, -1):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "        print('sent', pid)\n"
            "    except OSError as error:\n"
            "        print(type(error).__name__)\n"
        )
        result = run_python(code)
        assert result.stdout.splitlines() == ["PermissionError"] * 4
        time.sleep(0.1)
        assert victim.poll() is None  # still alive
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def test_temp_dir_is_removed_and_parent_unaffected(tmp_path):
    result = run_python("import os\nprint(os.getcwd())\nopen('x', 'w').write('1')")
    workdir = result.stdout.strip()
    assert "picochat-sandbox-" in workdir and not os.path.exists(workdir)
    assert threading.main_thread().is_alive() and os.getcwd()  # the parent carries on
