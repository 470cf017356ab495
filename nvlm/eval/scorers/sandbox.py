"""HumanEval execution sandbox: each program in a fresh ``python -I`` process, limited and guarded.

Mirrors the design of ``openai/human-eval human_eval/execution.py`` (``check_correctness``: temp working
folder, ``reliability_guard``, swallowed output, a timeout; results ``passed`` / ``timed out`` /
``failed: <message>``), made stricter (written anew, no code copied):

* a separate interpreter (``python -I``: no user site, no PYTHON* variables, no script folder on sys.path)
  started with a minimal environment, its own session (the whole group is killed on time-out) and a fresh
  temporary folder as working directory, removed afterwards;
* when the parent runs as root, the child runs as ``nobody`` (so ``RLIMIT_NPROC`` and file permissions bite);
  this is checked once with a trivial program and silently skipped where the interpreter is not reachable
  by ``nobody`` (then the guard below is the barrier);
* resource limits in the child: address space (default 1 GiB), CPU seconds (timeout + 1), file size
  (16 MiB), no new processes, no core files;
* the guard of ``_sandbox_child.py`` (process creation, ``os.system``, signals, deletion, sockets and writes
  outside the temporary folder raise ``PermissionError``), then ``exec`` under a SIGALRM timer;
* a wall-clock limit in the parent (timeout + ``STARTUP_SLACK`` s) after which the process group is killed.

It protects against accidents of generated code, not against code written to escape it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = 10.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
STARTUP_SLACK = 5.0
NOBODY = 65534
_CHILD_SOURCE = (Path(__file__).with_name("_sandbox_child.py")).read_text(encoding="utf-8")
_DROP_OK: bool | None = None


class SandboxError(RuntimeError):
    """The sandbox itself does not work (a trivial program cannot run): nothing can be scored."""


@dataclass(frozen=True)
class Limits:
    timeout: float = DEFAULT_TIMEOUT
    memory_bytes: int | None = MEMORY_BYTES
    file_bytes: int | None = FILE_BYTES


def _run(program: str, limits: Limits, drop: bool) -> str:
    tmpdir = tempfile.mkdtemp(prefix="nvlm-humaneval-")
    try:
        kwargs: dict = {}
        if drop:
            os.chown(tmpdir, NOBODY, NOBODY)
            kwargs = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        nonce = secrets.token_hex(16)
        spec = {
            "program": program,
            "timeout": limits.timeout,
            "tmpdir": tmpdir,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "nonce": nonce,
        }
        env = {
            "PATH": os.defpath,
            "HOME": tmpdir,
            "TMPDIR": tmpdir,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
        }
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and code
            [sys.executable, "-I", "-c", _CHILD_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=tmpdir,
            env=env,
            start_new_session=True,
            umask=0o077,
            **kwargs,
        )
        try:
            out, _ = proc.communicate(json.dumps(spec).encode(), timeout=limits.timeout + STARTUP_SLACK)
        except subprocess.TimeoutExpired:
            _kill_group(proc)  # the whole session, before the child is reaped
            proc.communicate()
            return "timed out"
        for line in reversed(out.decode(errors="replace").splitlines()):
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("nonce") == nonce:
                return str(message.get("result"))
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return "timed out"
        return f"failed: the program ended without a result (exit status {proc.returncode})"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _can_drop() -> bool:
    """Whether the child can run as ``nobody`` here (root only; probed once per process)."""
    global _DROP_OK
    if _DROP_OK is None:
        _DROP_OK = False
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            try:
                _DROP_OK = _run("pass", Limits(timeout=10.0), drop=True) == "passed"
            except OSError:
                _DROP_OK = False
    return _DROP_OK


def run_program(program: str, limits: Limits | None = None) -> str:
    """Run one program; ``"passed"``, ``"timed out"`` or ``"failed: <message>"``."""
    return _run(program, limits or Limits(), drop=_can_drop())


def run_programs(programs: list[str], limits: Limits | None = None, workers: int | None = None) -> list[str]:
    """Run many programs in parallel (``workers`` processes at a time); results in input order.

    Raises SandboxError if the sandbox cannot even run ``pass``, so that a broken set-up is never reported as
    a score of zero.
    """
    limits = limits or Limits()
    if run_program("pass", Limits(timeout=max(limits.timeout, 5.0))) != "passed":
        raise SandboxError("the HumanEval sandbox cannot run a trivial program on this machine")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))
