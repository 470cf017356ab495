"""Child side of the HumanEval sandbox: its source is run as ``python -I -c <this file's text>``.

Not imported by the package. Protocol: one JSON object on stdin ``{"program", "timeout", "tmpdir",
"memory_bytes", "file_bytes", "nonce"}``; one JSON line ``{"nonce", "result"}`` on the original stdout, where
``result`` is ``"passed"``, ``"timed out"`` or ``"failed: <message>"`` (as openai/human-eval reports them).
The candidate's own stdout/stderr go to /dev/null. Before the candidate runs: resource limits (address
space, CPU seconds, file size, no new processes, no core files), then a guard in the spirit of human-eval's
``reliability_guard`` (written anew): process creation, signals, ``os.system``, deletion, renaming,
permission changes and sockets raise ``PermissionError``; opening a file for writing outside ``tmpdir`` does too.
This is a guard against accidents, not a security boundary against hostile code.
"""

import _posixsubprocess
import _socket
import builtins
import faulthandler
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading  # noqa: F401 - imported before os.register_at_fork is blocked

BLOCKED_OS = (
    "system", "popen", "fork", "forkpty", "kill", "killpg", "putenv", "unsetenv", "remove", "removedirs", "rmdir",
    "unlink", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown",
    "fchown", "lchown", "chroot", "fchdir", "chdir", "setuid", "setgid", "setreuid", "setregid", "setresuid",
    "setresgid", "link", "symlink", "mkfifo", "mknod", "execl", "execle", "execlp", "execlpe", "execv", "execve",
    "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp", "register_at_fork", "_exit", "abort",
)  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class SandboxTimeout(BaseException):
    """Raised by the alarm; a BaseException so that ``except Exception`` in the candidate does not eat it."""


def _blocked(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the HumanEval sandbox")

    return blocked


def _limits(spec):
    try:
        import resource
    except ImportError:  # not POSIX: the parent's wall-clock timeout still applies
        return
    for name, value in (
        ("RLIMIT_AS", spec["memory_bytes"]),
        ("RLIMIT_CPU", int(spec["timeout"]) + 1),
        ("RLIMIT_FSIZE", spec["file_bytes"]),
        ("RLIMIT_NPROC", 0),  # no fork for this user (ignored when running as root; the guard covers it)
        ("RLIMIT_CORE", 0),
    ):
        if value is not None and hasattr(resource, name):
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (ValueError, OSError):
                pass


def _guard(tmpdir):
    real_open, real_os_open = builtins.open, os.open
    root = os.path.realpath(tmpdir)

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
        return full == root or full.startswith(root + os.sep)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the sandbox folder is disabled: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS and not inside(path):
            raise PermissionError(f"writing outside the sandbox folder is disabled: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    class GuardedFileIO(io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not inside(file):
                raise PermissionError(f"writing outside the sandbox folder is disabled: {file!r}")
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open
    io.FileIO = GuardedFileIO
    os.open = guarded_os_open
    for name in BLOCKED_OS:
        if hasattr(os, name):
            setattr(os, name, _blocked("os." + name))
    builtins.exit = builtins.quit = _blocked("exit")
    _posixsubprocess.fork_exec = _blocked("fork_exec")

    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, _blocked("shutil." + name))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _blocked("subprocess." + name))
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):  # fmt: skip
            if hasattr(module, name):
                setattr(module, name, _blocked("socket." + name))
    for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty", "resource", "psutil"):
        sys.modules[name] = None  # importing them now raises ImportError


def main():
    spec = json.loads(sys.stdin.read())
    sys.stdin.close()
    report = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    write, exit_now = os.write, os._exit

    def finish(status):
        write(report, (json.dumps({"nonce": spec["nonce"], "result": status}) + "\n").encode())
        exit_now(0)

    faulthandler.disable()
    _limits(spec)
    _guard(spec["tmpdir"])

    def on_alarm(signum, frame):
        raise SandboxTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(spec["timeout"]))
    try:
        exec(compile(spec["program"], "<candidate>", "exec"), {"__name__": "__candidate__"})  # noqa: S102
        status = "passed"
    except SandboxTimeout:
        status = "timed out"
    except BaseException as exc:  # noqa: B036 - every failure of the candidate is a result
        status = f"failed: {exc}"
    signal.setitimer(signal.ITIMER_REAL, 0)
    finish(status)


main()
