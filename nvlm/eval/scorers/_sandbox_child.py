"""Child side of the HumanEval sandbox: its source is run as ``python -I -c <this file's text>``.

Not imported by the package (only read as text by ``sandbox.py``). One JSON spec on stdin; the verdict is this
process's EXIT STATUS, read by the parent (0 = ran to the end, 1 = failed, 124 = timed out, 70 = the sandbox
could not be set up); a one-line detail for failures goes to the original stderr (bounded by the parent, never
used for the verdict). The candidate's own stdout/stderr go to /dev/null. Roles:

* ``program``: run one whole program (prompt + completion + test + ``check(...)``) in this process. The program's
  own code decides its exit status, so hostile code can fake a pass here (as in openai/human-eval).
* ``candidate``: run ``prompt + completion`` and then answer calls to the entry point arriving as JSON lines on
  ``request_fd``, replying on ``response_fd``. Its exit status is ignored.
* ``tests``: run ``prompt + test`` and ``check(proxy)``, where ``proxy`` forwards each call to the candidate
  process (another sandbox) and turns its reply into plain values by a strict decoder (None, bool, int, float,
  str, bytes, complex, list, tuple, set, frozenset, dict). No candidate code ever runs in this process, so a
  candidate cannot reach the tests, their objects or this exit status: a pass cannot be forged.

Before untrusted code runs: resource limits (address space, CPU seconds, file size, open files, no core
files), a seccomp filter (no new processes or threads, no exec, no sockets, no mount/namespace/ptrace/bpf/
io_uring/keyring calls; needed because the sandbox user maps to the host's root, which RLIMIT_NPROC exempts),
then the Python-level guard of human-eval's ``reliability_guard`` spirit (kept for clear messages such as
"os.system is disabled"). The operating-system boundary (namespaces, read-only file system) is ``sandbox.py``'s.
"""

import _posixsubprocess
import _socket
import builtins
import ctypes
import errno
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
MAX_LINE = 1 << 20  # one request or reply; longer is a failure, not a memory blow-up
# System-call numbers denied by the seccomp filter (x86_64: unistd_64.h; aarch64: asm-generic/unistd.h).
DENIED = {
    # clone clone3 fork vfork execve execveat socket socketpair ptrace pivot_root chroot mount umount2 add_key
    # request_key keyctl unshare perf_event_open name_to_handle_at open_by_handle_at setns process_vm_readv
    # process_vm_writev bpf userfaultfd io_uring_setup/enter/register open_tree move_mount fsopen fsmount fspick
    "x86_64": (0xC000003E, (56, 435, 57, 58, 59, 322, 41, 53, 101, 155, 161, 165, 166, 248, 249, 250, 272, 298,
                            303, 304, 308, 310, 311, 321, 323, 425, 426, 427, 428, 429, 430, 432, 433)),
    "aarch64": (0xC00000B7, (220, 435, 221, 281, 198, 199, 117, 41, 51, 40, 39, 217, 218, 219, 97, 241, 264, 265,
                             268, 270, 271, 280, 282, 425, 426, 427, 428, 429, 430, 432, 433)),
}  # fmt: skip


class SandboxTimeout(BaseException):
    """Raised by the alarm; a BaseException so that ``except Exception`` in the code does not eat it."""


class CandidateError(Exception):
    """The candidate process failed a call (its exception, a bad reply, or it is gone)."""


def _blocked(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the HumanEval sandbox")

    return blocked


def _limits(spec):
    import resource

    for name, value in (
        ("RLIMIT_AS", spec["memory_bytes"]),
        ("RLIMIT_CPU", int(spec["timeout"]) + 1),
        ("RLIMIT_FSIZE", spec["file_bytes"]),
        ("RLIMIT_NOFILE", 64),
        ("RLIMIT_CORE", 0),
    ):
        if value is not None:
            resource.setrlimit(getattr(resource, name), (value, value))


def _seccomp():
    """Install the deny-list filter (EPERM; a foreign architecture's call is fatal). Raises OSError on failure."""
    arch, numbers = DENIED[os.uname().machine]
    prog = [
        (0x20, 0, 0, 4),
        (0x15, 1, 0, arch),
        (0x06, 0, 0, 0x80000000),
        (0x20, 0, 0, 0),
    ]  # check arch; load nr
    if arch == 0xC000003E:
        prog.append((0x35, len(numbers) + 1, 0, 0x40000000))  # x32 ABI calls: denied
    prog += [(0x15, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]  # match -> jump to the EPERM return
    prog += [(0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x00050000 | errno.EPERM)]  # allow ; deny

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint32),
        ]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    program = Program(len(prog), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(22, 2, ctypes.addressof(program), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


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
        sys.modules[name] = None  # importing them now raises ImportError (the seccomp filter is the real barrier)


# ---- values crossing between the candidate and the tests: plain data only ----
_TAGS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def encode(value):
    """Plain JSON-able form of a value (runs on either side; the candidate side is untrusted anyway)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    for tag, kind in _TAGS.items():
        if isinstance(value, kind):
            return {tag: [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {type(value).__name__} cannot cross the sandbox (plain values only)")


def decode(data):
    """Strict inverse of encode: builds only built-in values, never calls code the other side defined."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is dict and len(data) == 1:
        ((tag, inner),) = data.items()
        if type(inner) is list:
            if tag in _TAGS:
                return _TAGS[tag](decode(v) for v in inner)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in inner):
                return {decode(k): decode(v) for k, v in inner}
            if tag == "complex" and len(inner) == 2 and all(type(v) in (int, float) for v in inner):
                return complex(*inner)
        if tag == "bytes" and type(inner) is str:
            return bytes.fromhex(inner)
    raise ValueError("malformed value")


def _send(stream, message):
    stream.write((json.dumps(message) + "\n").encode())
    stream.flush()


def _receive(stream):
    line = stream.readline(MAX_LINE + 1)
    if not line:
        raise CandidateError("the candidate process ended")
    if len(line) > MAX_LINE:
        raise CandidateError(f"the candidate's reply is longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line)
        if type(message) is not dict:
            raise ValueError
        if "error" in message:
            return None, str(message["error"])[:500]
        return decode(message["value"]), None
    except (ValueError, KeyError, TypeError, RecursionError, MemoryError):
        raise CandidateError("malformed reply from the candidate process") from None


def _describe(exc):
    return f"{exc}" or type(exc).__name__


def _serve(spec, namespace):
    """Candidate role: answer calls until the requests pipe closes."""
    requests = os.fdopen(spec["request_fd"], "rb")
    replies = os.fdopen(spec["response_fd"], "wb")
    try:
        exec(compile(spec["source"], "<candidate>", "exec"), namespace)  # noqa: S102
        function = namespace[spec["entry_point"]]
        _send(replies, {"value": None})
    except BaseException as exc:  # noqa: B036 - reported to the tests, which then fail
        _send(replies, {"error": _describe(exc)})
        return
    while line := requests.readline(MAX_LINE + 1):
        try:
            reply = {"value": encode(function(*decode(json.loads(line))))}
        except BaseException as exc:  # noqa: B036
            reply = {"error": _describe(exc)}
        _send(replies, reply)


def _run_tests(spec, namespace):
    """Tests role: the problem's own prompt and tests, with the entry point answered by the candidate process."""
    requests = os.fdopen(spec["request_fd"], "wb")
    replies = os.fdopen(spec["response_fd"], "rb")
    _, error = _receive(replies)  # the candidate's definitions ran (or why not)
    if error is not None:
        raise CandidateError(error)

    def proxy(*args):
        _send(requests, encode(list(args)))
        value, error = _receive(replies)
        if error is not None:
            raise CandidateError(error)
        return value

    prompt = spec["prompt"]
    try:
        code = compile(prompt, "<prompt>", "exec")
    except SyntaxError:  # a prompt that ends right after a signature: give it a body
        code = compile(prompt + "\n    pass\n", "<prompt>", "exec")
    exec(code, namespace)  # noqa: S102 - the problem's helpers (e.g. HumanEval/32's poly)
    namespace[spec["entry_point"]] = proxy
    exec(compile(spec["test"] + "\ncheck(" + spec["entry_point"] + ")\n", "<test>", "exec"), namespace)  # noqa: S102


def main():
    spec = json.loads(sys.stdin.buffer.read())
    detail = os.dup(2)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    write, exit_now = os.write, os._exit

    def finish(status, message=""):
        if message:
            write(detail, (" ".join(message.split())[:2000] + "\n").encode(errors="replace"))
        exit_now(status)

    faulthandler.disable()
    try:
        _limits(spec)
        _seccomp()
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        if spec["isolated"]:  # the boundary is incomplete: refuse to run anything
            finish(70, f"sandbox setup: {exc}")
    _guard(spec["tmpdir"])

    def on_alarm(signum, frame):
        raise SandboxTimeout()

    if spec["role"] != "candidate":  # the tests' clock decides a time-out; the candidate just gets killed
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, float(spec["timeout"]))
    namespace = {"__name__": "__main__" if spec["role"] == "tests" else "__candidate__"}
    try:
        if spec["role"] == "candidate":
            _serve(spec, namespace)
        elif spec["role"] == "tests":
            _run_tests(spec, namespace)
        else:
            exec(compile(spec["program"], "<candidate>", "exec"), namespace)  # noqa: S102
    except SandboxTimeout:
        finish(124)
    except BaseException as exc:  # noqa: B036 - every failure is a result
        finish(1, _describe(exc))
    signal.setitimer(signal.ITIMER_REAL, 0)
    finish(0)


main()
