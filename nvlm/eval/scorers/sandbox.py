"""HumanEval execution sandbox: model-written code runs behind an operating-system boundary.

Each program runs in ``python -I`` (``_sandbox_child.py``) started by bubblewrap (``bwrap``; Debian/Ubuntu package
``bubblewrap``) with:

* its own user, mount, pid, network, IPC and UTS namespaces (``--unshare-all --unshare-user``), uid 65534 inside,
  all capabilities dropped, a new session (no terminal injection);
* a file system made of read-only binds of the system and interpreter folders only (``/usr``, ``/lib*``, the
  Python prefix; no ``/root``, ``/home``, ``/work``, ``/etc``), a fresh ``/proc`` and ``/dev``, and a private
  writable ``/tmp`` (tmpfs of ``TMPFS_BYTES``; the working folder is ``/tmp/work``) that vanishes with it;
* no network: the new network namespace has only its own loopback (the host's 127.0.0.1 is unreachable);
* in the child, before untrusted code: rlimits (address space, CPU, file size, open files, no core), a seccomp
  filter (no processes, threads, exec, sockets, mounts, namespaces, ptrace...), then the Python guard;
* a wall-clock limit (timeout + ``STARTUP_SLACK``) after which bwrap is killed; ``--die-with-parent`` then kills
  the namespace's init, and the kernel every process in that pid namespace, detached ones included;
* the verdict from the EXIT STATUS of the harness, read by this process; the only text read back is a failure
  detail capped at ``DETAIL_BYTES`` (the rest is discarded unread into memory), never parsed for a verdict.

``run_problems`` (preferred) puts the candidate (prompt + completion) and the tests (prompt + test + check) in
two separate sandboxes joined by two pipes carrying plain values (JSON, strictly decoded), so that nothing the
candidate does can reach the tests' objects or exit status: a pass cannot be forged (a returned object whose
``__eq__`` is always True, patched builtins, ``os._exit(0)``... all fail). ``run_programs`` runs one assembled
program in one sandbox, as openai/human-eval does: isolated from the host, but its verdict can be faked by
hostile code. Without bwrap (or where it cannot create namespaces) both refuse with ``SandboxError`` saying why,
unless ``Limits(unsafe_exec=True)`` or the environment variable ``NVLM_UNSAFE_EXEC=1`` (then: same child, no
namespaces, a host temp folder; rlimits, seccomp and the guard remain).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

DEFAULT_TIMEOUT = 10.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
TMPFS_BYTES = 64 << 20
DETAIL_BYTES = 4096
STARTUP_SLACK = 5.0
UNSAFE_ENV = "NVLM_UNSAFE_EXEC"
SANDBOX_DIR = "/tmp/work"  # inside the sandbox: the working folder (the guard's "inside"), on the private /tmp
_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text(encoding="utf-8")
_ISOLATION: tuple[bool, str] | None = None
_ISOLATION_LOCK = threading.Lock()


class SandboxError(RuntimeError):
    """The sandbox cannot run here (no isolation, or a trivial program fails): nothing can be scored."""


@dataclass(frozen=True)
class Limits:
    timeout: float = DEFAULT_TIMEOUT
    memory_bytes: int | None = MEMORY_BYTES
    file_bytes: int | None = FILE_BYTES
    unsafe_exec: bool = False  # run without namespaces where bwrap is unavailable (the host is then exposed)


class Problem(NamedTuple):
    prompt: str
    completion: str
    test: str
    entry_point: str


def _read_only_args() -> list[str]:
    """Read-only binds of the system and interpreter folders; merged-/usr links (``/lib -> usr/lib``) kept as links."""
    python = Path(os.path.realpath(sys.executable))
    args, seen = [], set()
    for path in (
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/bin",
        "/sbin",
        sys.base_prefix,
        sys.prefix,
        str(python.parent),
    ):
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)
        if os.path.islink(path) and os.path.dirname(path) == "/":
            args += ["--symlink", os.readlink(path), path]
        else:
            args += ["--ro-bind", os.path.realpath(path), path]
    return args


def _command(isolated: bool) -> list[str]:
    python = [os.path.realpath(sys.executable), "-I", "-c", _CHILD_SOURCE]
    if not isolated:
        return python
    args = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--uid",
        "65534",
        "--gid",
        "65534",
    ]
    args += ["--cap-drop", "ALL", "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for key, value in (
        ("PATH", "/usr/bin:/bin"),
        ("HOME", SANDBOX_DIR),
        ("TMPDIR", SANDBOX_DIR),
        ("LANG", "C.UTF-8"),
    ):
        args += ["--setenv", key, value]
    args += _read_only_args()
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(TMPFS_BYTES),
        "--tmpfs",
        "/tmp",
    ]
    return args + ["--dir", SANDBOX_DIR, "--chdir", SANDBOX_DIR, "--", *python]


def _start(spec: dict, isolated: bool, tmpdir: str | None, pass_fds=(), detail: bool = True) -> subprocess.Popen:
    env = {"PATH": os.defpath, "HOME": tmpdir or "/tmp", "TMPDIR": tmpdir or "/tmp", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and harness
        _command(isolated),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if detail else subprocess.DEVNULL,
        cwd=tmpdir or "/",
        env=env,
        start_new_session=True,  # bwrap (or the unsafe child) leads its own group: one killpg ends it
        pass_fds=pass_fds,
        umask=0o077,
    )
    assert proc.stdin is not None  # stdin=PIPE
    try:
        proc.stdin.write(
            json.dumps({**spec, "isolated": isolated, "tmpdir": SANDBOX_DIR if isolated else tmpdir}).encode()
        )
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died at start; its exit status tells
    return proc


def _bounded_reader(stream) -> tuple[threading.Thread, bytearray]:
    """Keep the first DETAIL_BYTES of a stream, read and drop the rest (a flood cannot fill memory or block)."""
    kept = bytearray()

    def drain():
        while chunk := stream.read(65536):
            kept.extend(chunk[: max(0, DETAIL_BYTES - len(kept))])

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread, kept


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap dies; --die-with-parent takes the whole pid namespace
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _verdict(proc: subprocess.Popen, limits: Limits) -> str:
    """Wait for the verdict process; ``"passed"``, ``"timed out"`` or ``"failed: <detail>"``."""
    assert proc.stderr is not None  # a verdict process is started with detail=True: stderr=PIPE
    reader, kept = _bounded_reader(proc.stderr)
    try:
        status = proc.wait(timeout=limits.timeout + STARTUP_SLACK)
    except subprocess.TimeoutExpired:
        return "timed out"
    finally:
        _kill(proc)
        reader.join(timeout=1.0)
        proc.stderr.close()
    if status == 0:
        return "passed"
    if status in (124, -signal.SIGXCPU, -signal.SIGKILL):
        return "timed out"
    text = " ".join(bytes(kept).decode(errors="replace").split())
    return f"failed: {text}" if text else f"failed: the program ended with exit status {status}"


def _workdir(isolated: bool) -> str | None:
    return None if isolated else tempfile.mkdtemp(prefix="nvlm-humaneval-")


def _spec(limits: Limits, role: str, **fields) -> dict:
    return {"role": role, "timeout": limits.timeout, "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes, **fields}  # fmt: skip


def _run_program(program: str, limits: Limits, isolated: bool) -> str:
    tmpdir = _workdir(isolated)
    try:
        return _verdict(_start(_spec(limits, "program", program=program), isolated, tmpdir), limits)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _run_problem(problem: Problem, limits: Limits, isolated: bool) -> str:
    tmpdirs = [_workdir(isolated), _workdir(isolated)]
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    pipes = [request_read, request_write, reply_read, reply_write]
    candidate = None
    try:
        candidate = _start(
            _spec(limits, "candidate", source=problem.prompt + problem.completion, entry_point=problem.entry_point,
                  request_fd=request_read, response_fd=reply_write),  # fmt: skip
            isolated, tmpdirs[0], pass_fds=(request_read, reply_write), detail=False,
        )  # fmt: skip
        tests = _start(
            _spec(limits, "tests", prompt=problem.prompt, test=problem.test, entry_point=problem.entry_point,
                  request_fd=request_write, response_fd=reply_read),  # fmt: skip
            isolated, tmpdirs[1], pass_fds=(request_write, reply_read),
        )  # fmt: skip
        while pipes:  # our copies: the sandboxes must see end-of-file when the other side dies
            os.close(pipes.pop())
        return _verdict(tests, limits)
    finally:
        for fd in pipes:  # each exactly once: another thread may already reuse a closed number
            os.close(fd)
        if candidate is not None:
            _kill(candidate)
        for tmpdir in tmpdirs:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)


def isolation() -> tuple[bool, str]:
    """``(True, mechanism)`` where bwrap gives each program its namespaces, else ``(False, why not)``; probed once."""
    global _ISOLATION
    with _ISOLATION_LOCK:
        if _ISOLATION is None:
            if shutil.which("bwrap") is None:
                _ISOLATION = (
                    False,
                    "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)",
                )
            else:
                probe = _run_program("pass", Limits(timeout=10.0), isolated=True)
                _ISOLATION = (True, "bubblewrap: user/mount/pid/net/ipc/uts namespaces, read-only system, seccomp") \
                    if probe == "passed" else (False, f"bwrap cannot create the sandbox here ({probe})")  # fmt: skip
    return _ISOLATION


def _isolated(limits: Limits) -> bool:
    """True to use namespaces; False where the user allowed unsafe execution; SandboxError otherwise."""
    available, reason = isolation()
    if available:
        return True
    if limits.unsafe_exec or os.environ.get(UNSAFE_ENV) == "1":
        return False
    raise SandboxError(
        f"refusing to run model-written code without isolation: {reason}. Install bubblewrap, or accept the risk "
        f"with --unsafe-exec (or {UNSAFE_ENV}=1): the code could then read, change and delete your files"
    )


def run_program(program: str, limits: Limits | None = None) -> str:
    """Run one whole program; ``"passed"``, ``"timed out"`` or ``"failed: <message>"``."""
    limits = limits or Limits()
    return _run_program(program, limits, _isolated(limits))


def run_problem(problem: Problem, limits: Limits | None = None) -> str:
    """Run one problem with candidate and tests in separate sandboxes (unforgeable verdict); as ``run_program``."""
    limits = limits or Limits()
    return _run_problem(problem, limits, _isolated(limits))


def _run_all(run, items: list, limits: Limits | None, workers: int | None) -> list[str]:
    limits = limits or Limits()
    if run_program("pass", Limits(timeout=max(limits.timeout, 5.0), unsafe_exec=limits.unsafe_exec)) != "passed":
        raise SandboxError("the HumanEval sandbox cannot run a trivial program on this machine")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: run(item, limits), items))


def run_programs(programs: list[str], limits: Limits | None = None, workers: int | None = None) -> list[str]:
    """Run many programs in parallel; results in input order. SandboxError if even ``pass`` cannot run (a broken
    set-up is never reported as a score of zero) or where there is no isolation and no ``unsafe_exec``."""
    return _run_all(run_program, programs, limits, workers)


def run_problems(problems: list[Problem], limits: Limits | None = None, workers: int | None = None) -> list[str]:
    """``run_problem`` for many problems in parallel; results in input order; SandboxError as ``run_programs``."""
    return _run_all(run_problem, problems, limits, workers)
