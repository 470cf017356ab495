"""HumanEval sandbox as an operating-system boundary: attacks that get past the Python guard (through ``posix``,
``ctypes`` or classes the guard does not patch) must still write, delete, connect, spawn, outlive the clock,
flood the result and forge a pass in vain; and without isolation the sandbox refuses unless told otherwise."""

from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest

from nvlm.eval.scorers import sandbox
from nvlm.eval.scorers.sandbox import Limits, Problem, SandboxError, run_problem, run_problems, run_programs

TIMEOUT = 2.0
PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
MARKER = "nvlmsbxattack"  # a process name the attacks give themselves, to look for on the host afterwards
UNGUARD = (
    "import sys\nfor m in ('ctypes', '_ctypes'):\n    sys.modules.pop(m, None)\n"
    "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
)

needs_isolation = pytest.mark.skipif(not sandbox.isolation()[0], reason=sandbox.isolation()[1])


def _body(code: str, then: str = "return a + b") -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n") + "\n" + then, "    ") + "\n"


def _attacks(outside: str, port: int) -> dict[str, str]:
    """Completions of ``add`` that try to escape, then return the right value (so only the attack can fail them)."""
    rename = f"import posix\nfd = posix.open('/proc/self/comm', posix.O_WRONLY)\nposix.write(fd, b'{MARKER}')\n"
    return {
        "posix_write_outside": _body(f"import posix\nposix.open({outside!r}, posix.O_WRONLY | posix.O_CREAT)"),
        "posix_write_usr": _body("import posix\nposix.open('/usr/nvlm-escaped', posix.O_WRONLY | posix.O_CREAT)"),
        "posix_delete_outside": _body(f"import posix\nposix.unlink({outside + '.keep'!r})"),
        "read_etc_passwd": _body("import posix\nraise Exception(posix.read(posix.open('/etc/passwd', 0), 999))"),
        "socket_type_connect": _body(f"import socket\nsocket.SocketType(2, 1).connect(('127.0.0.1', {port}))"),
        "ctypes_connect": _body(UNGUARD + "assert libc.socket(2, 1, 0) >= 0, os.strerror(ctypes.get_errno())"),
        "ctypes_fork": _body(UNGUARD + "assert libc.fork() >= 0, os.strerror(ctypes.get_errno())"),
        "ctypes_exec_shell": _body(
            UNGUARD + "libc.execv(b'/bin/sh', None)\nraise OSError(os.strerror(ctypes.get_errno()))"
        ),
        "posix_fork_detached_sleeper": _body(
            rename + "pid = posix.fork()\nif pid == 0:\n    posix.setsid()\n    while True:\n        pass"
        ),  # fmt: skip
        "loop_forever_renamed": _body(rename + "while True:\n    pass"),
        "thread_escape": _body("import threading\nthreading.Thread(target=lambda: None).start()"),
        # a pass is faked: only code that really returns 3 and 0 may pass
        "always_equal": _body("class E:\n    __eq__ = lambda self, other: True", then="return E()"),
        "posix_exit_zero": _body("import posix\nposix._exit(0)"),
        "exit_zero_at_import": "    return 0\nimport posix\nposix._exit(0)\n",
        "patch_assertion": "    return 0\nimport builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})\n",
        "fake_report": _body(
            "import posix\nfor fd in range(3, 20):\n    try:\n        posix.write(fd, "
            'b\'passed\\n{"result": "passed"}\\n\')\n    except OSError:\n        pass',
            then="return 0",
        ),  # fmt: skip
        "hunt_harness_objects": _body(
            "import gc\nfor o in gc.get_objects():\n    if isinstance(o, dict) and "
            "'role' in o:\n        o['role'] = 'program'",
            then="return 0",
        ),  # fmt: skip
        "settrace_skip": "    return 0\nimport sys\nsys.settrace(lambda *a: None)\n",
        "huge_error": _body("raise Exception('x' * 10_000_000)"),
        "correct": "    return a + b\n",
    }


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    outside = str(tmp_path_factory.mktemp("outside") / "escaped.txt")
    with open(outside + ".keep", "w") as handle:  # a file outside the sandbox that must survive
        handle.write("keep")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    attacks = _attacks(outside, listener.getsockname()[1])
    started = time.monotonic()
    results = run_problems([Problem(PROMPT, c, TEST, "add") for c in attacks.values()], Limits(timeout=TIMEOUT), 4)
    elapsed = time.monotonic() - started
    try:
        connection, _ = listener.accept()
        connection.close()
        connected = True
    except TimeoutError:
        connected = False
    listener.close()
    time.sleep(0.5)  # the kernel tears down killed pid namespaces asynchronously
    return dict(zip(attacks, results)), outside, connected, elapsed


@needs_isolation
def test_no_forged_pass_and_correct_code_passes(attacked):
    results = attacked[0]
    assert results["correct"] == "passed"
    forged = [name for name, status in results.items() if status == "passed" and name != "correct"]
    assert forged == [], {name: results[name] for name in forged}


@needs_isolation
def test_no_file_written_or_deleted_outside(attacked):
    results, outside = attacked[0], attacked[1]
    assert not os.path.exists(outside)
    assert open(outside + ".keep").read() == "keep"
    assert "No such file" in results["posix_delete_outside"]
    assert "Read-only file system" in results["posix_write_usr"] and not os.path.exists("/usr/nvlm-escaped")
    assert "No such file" in results["read_etc_passwd"]  # /etc is not in the sandbox at all
    assert "root:" not in results["read_etc_passwd"]


@needs_isolation
def test_no_connection_and_no_process_left(attacked):
    results, connected = attacked[0], attacked[2]
    assert not connected
    for name in ("socket_type_connect", "ctypes_connect", "ctypes_fork", "ctypes_exec_shell",
                 "posix_fork_detached_sleeper"):  # fmt: skip
        assert results[name].startswith("failed:") and "not permitted" in results[name], (name, results[name])
    assert results["thread_escape"].startswith("failed:")
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as handle:
                if MARKER in handle.read():
                    left.append(pid)
        except OSError:
            pass
    assert left == []


@needs_isolation
def test_time_limit_held_and_result_bounded(attacked):
    results, elapsed = attacked[0], attacked[3]
    assert results["loop_forever_renamed"] == "timed out"
    assert elapsed < 4 * (TIMEOUT + sandbox.STARTUP_SLACK)  # 19 programs on 4 workers, 2 of them time out
    assert max(len(status) for status in results.values()) <= sandbox.DETAIL_BYTES + 20


@needs_isolation
def test_whole_program_mode_is_isolated_and_bounded(tmp_path):
    outside = tmp_path / "escaped.txt"
    flood = "import posix\nfor fd in range(3, 20):\n    try:\n        posix.write(fd, b'x' * 1_000_000)\n" \
            "    except OSError:\n        pass\nraise SystemExit(3)\n"  # fmt: skip
    statuses = run_programs(
        [f"import posix\nposix.open({str(outside)!r}, posix.O_WRONLY | posix.O_CREAT)", flood, "pass"],
        Limits(timeout=TIMEOUT),
    )
    assert not outside.exists() and statuses[0].startswith("failed:")
    assert statuses[1].startswith("failed:") and len(statuses[1]) <= sandbox.DETAIL_BYTES + 20
    assert statuses[2] == "passed"


def test_refuses_without_isolation_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: (False, "bubblewrap (bwrap) is not installed"))
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxError, match=r"bwrap\) is not installed.*--unsafe-exec"):
        run_problems([Problem(PROMPT, "    return a + b\n", TEST, "add")])
    # explicitly allowed: runs without namespaces (rlimits, seccomp and the guard still apply)
    good, bad = (run_problem(Problem(PROMPT, c, TEST, "add"), Limits(timeout=TIMEOUT, unsafe_exec=True))
                 for c in ("    return a + b\n", "    return a - b\n"))  # fmt: skip
    assert (good, bad) == ("passed", "failed: AssertionError")
