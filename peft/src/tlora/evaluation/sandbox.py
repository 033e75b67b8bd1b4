"""Run generated programs against their tests outside the scorer's process, with time and memory limits.

Layout: the scorer starts `workers` helper processes (`python -I -c WORKER_SOURCE`, with a stripped environment
that holds no API keys). Each helper receives one job at a time as a JSON line and forks a fresh child for it; the
child moves into a new session and an empty temporary working directory, sets its resource limits
(`RLIMIT_AS`/`RLIMIT_DATA` memory, `RLIMIT_CPU`, `RLIMIT_FSIZE`, no core files), disables the functions that
destroy or spawn things (`os.system`, `os.fork`, `os.kill`, `subprocess.Popen`, file removal, opening files for
writing, ...), runs the program, then each test under its own CPU-time alarm, and reports through a pipe. The
helper kills the child's whole process group when the job's wall-clock budget is spent. Generated code therefore
never runs in the scorer's process nor in the helper, and forking a warm helper costs milliseconds where starting a
Python interpreter per program would cost a fifth of a second.

This mirrors the guard of EvalPlus and OpenAI's human-eval (separate process, resource limits, dangerous functions
disabled). Like theirs, it is not a security boundary against deliberately malicious code: run untrusted models'
outputs inside a container or VM.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

logger = logging.getLogger(__name__)

PASSED = "passed"
FAILED = "failed"
TIMEOUT = "timeout"
ERROR = "error"  # the sandbox itself failed (helper died); says nothing about the program

# Environment variables the helpers keep; everything else (API keys included) is dropped.
KEPT_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")


@dataclass
class SandboxLimits:
    """Per-program limits: CPU seconds per test (and for defining the program), memory, written-file size.

    Per-test limits count CPU time, not wall-clock time, so that a busy machine does not turn slow-but-correct
    programs into failures (MBPP/123's reference needs about 6 CPU seconds, 12 wall seconds on two busy cores). A
    wall-clock backstop of `wall_factor` times the CPU budget catches programs that sleep or block.
    """

    timeout_per_test: float = 15.0
    memory_mb: int = 4096  # EvalPlus's default (EVALPLUS_MAX_MEMORY_BYTES = 4 GiB)
    max_file_mb: int = 16
    wall_factor: float = 3.0
    slack_seconds: float = 2.0

    def cpu_seconds(self, num_tests: int) -> float:
        """The CPU budget of a whole job: program definition + every test."""
        return self.timeout_per_test * (1 + max(1, num_tests))

    def wall_seconds(self, num_tests: int) -> float:
        """The wall-clock budget of a whole job."""
        return self.wall_factor * self.cpu_seconds(num_tests) + self.slack_seconds


@dataclass
class ProgramJob:
    """A program and its tests: `setup` runs after the program (e.g. test imports), then each test in order."""

    program: str
    tests: list[str]
    setup: str = ""
    stop_at_first_failure: bool = True


@dataclass
class ExecutionResult:
    """The outcome of one job."""

    status: str  # passed | failed | timeout | error
    tests_passed: list[bool] = field(default_factory=list)
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """Whether the program defined cleanly and every test passed."""
        return self.status == PASSED

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return asdict(self)


# The helper process. Self-contained (standard library only) because it runs under `python -I -c`, which neither
# imports this package nor puts any directory on sys.path that could shadow the standard library.
WORKER_SOURCE = r'''
import builtins, faulthandler, io, json, os, resource, select, shutil, signal, subprocess, sys, tempfile, time
import traceback

BASE_DIR = sys.argv[1]
ERROR_CHARS = 2000

# Imported once here so that forked children find them ready (benchmark programs use them a lot).
import bisect, collections, copy, datetime, decimal, fractions, functools, hashlib, heapq, itertools, math  # noqa
import operator, random, re, statistics, string, typing  # noqa


class SandboxTimeout(BaseException):
    """Raised by the per-test alarm; a BaseException so that `except Exception` in the program cannot hide it."""


class Sink(io.StringIO):
    """Swallows the program's output (bounded) and refuses to be read."""

    def write(self, text):
        return len(text)

    def read(self, *args, **kwargs):
        raise OSError("stdin is not available in the sandbox")

    readline = readlines = read


def alarm(seconds):
    """Raise SandboxTimeout once this process has used `seconds` more CPU time."""
    def handler(signum, frame):
        raise SandboxTimeout("exceeded %.1f CPU seconds" % seconds)
    signal.signal(signal.SIGPROF, handler)
    signal.setitimer(signal.ITIMER_PROF, seconds)


def disarm():
    signal.setitimer(signal.ITIMER_PROF, 0)


def set_limits(job):
    memory = int(job["memory_mb"]) * 1024 * 1024
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (memory, memory))
    cpu = int(job["cpu_seconds"]) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    size = int(job["max_file_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def guard():
    """Disable what could destroy files, spawn processes or signal other processes (as human-eval does)."""
    faulthandler.disable()
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise PermissionError("writing files is disabled in the sandbox")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = read_only_open
    io.open = read_only_open
    builtins.exit = None
    builtins.quit = None
    for name in ("kill", "killpg", "system", "remove", "removedirs", "rmdir", "unlink",
                 "rename", "renames", "replace", "truncate", "fork", "forkpty", "setuid", "setgid", "chmod",
                 "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir", "chdir", "execv", "execve",
                 "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl",
                 "spawnle", "posix_spawn", "posix_spawnp", "popen", "startfile", "plock", "nice", "setsid"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    subprocess.run = None
    subprocess.call = None
    subprocess.check_call = None
    subprocess.check_output = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def short_error(error):
    lines = traceback.format_exception_only(type(error), error)
    return "".join(lines).strip()[-ERROR_CHARS:]


def run_in_child(job):
    """Define the program, run setup and tests; returns the result dict. Runs in the forked child only."""
    timeout = float(job["timeout_per_test"])
    namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
    results = []
    sink = Sink()
    sys.stdin = sys.stdout = sys.stderr = sink
    try:
        program = compile(job["program"], "solution.py", "exec")
    except BaseException as error:
        return {"status": "failed", "tests_passed": [], "error": "program does not compile: " + short_error(error)}
    try:
        alarm(timeout)
        exec(program, namespace)
        if job.get("setup"):
            exec(compile(job["setup"], "setup.py", "exec"), namespace)
        disarm()
    except SandboxTimeout as error:
        return {"status": "timeout", "tests_passed": [], "error": "defining the program: " + str(error)}
    except BaseException as error:
        disarm()
        return {"status": "failed", "tests_passed": [], "error": "defining the program: " + short_error(error)}
    status, message = "passed", None
    for index, test in enumerate(job["tests"]):
        try:
            code = compile(test, "test_%d.py" % index, "exec")
            alarm(timeout)
            exec(code, namespace)
            disarm()
            results.append(True)
        except SandboxTimeout as error:
            results.append(False)
            if status == "passed":
                status, message = "timeout", "test %d: %s" % (index, error)
        except BaseException as error:
            disarm()
            results.append(False)
            if status == "passed":
                status, message = "failed", "test %d: %s" % (index, short_error(error) or type(error).__name__)
        if status != "passed" and job.get("stop_at_first_failure", True):
            break
    return {"status": status, "tests_passed": results, "error": message}


def child_main(job, write_fd, work_dir):
    try:
        os.setsid()
        os.chdir(work_dir)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.environ["HOME"] = work_dir
        os.environ["TMPDIR"] = work_dir
        set_limits(job)
        write = os.write
        guard()
        result = run_in_child(job)
        data = json.dumps(result).encode()
        while data:
            written = write(write_fd, data)
            data = data[written:]
    finally:
        os._exit(0)


def kill_group(pid):
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_job(job):
    work_dir = tempfile.mkdtemp(dir=BASE_DIR)
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        child_main(job, write_fd, work_dir)
    os.close(write_fd)
    deadline = start + float(job["wall_seconds"])
    chunks, timed_out = [], False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    kill_group(pid)
    _, wait_status = os.waitpid(pid, 0)
    os.close(read_fd)
    shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.monotonic() - start
    if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGXCPU:
        timed_out = True
    if timed_out:
        return {"status": "timeout", "tests_passed": [], "error": "wall-clock limit of %.1f s" % job["wall_seconds"],
                "seconds": seconds}
    try:
        result = json.loads(b"".join(chunks).decode())
    except ValueError:
        result = {"status": "failed", "tests_passed": [],
                  "error": "the program ended the process before the tests finished (exit, crash or memory limit)"}
    result["seconds"] = seconds
    return result


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = run_job(json.loads(line))
        except Exception as error:
            result = {"status": "error", "tests_passed": [], "error": "sandbox helper: %r" % (error,), "seconds": 0.0}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


main()
'''


def default_workers() -> int:
    """The number of CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def sandbox_environment() -> dict[str, str]:
    """The helpers' environment: locale and PATH only, one thread per numeric library, no secrets."""
    environment = {name: os.environ[name] for name in KEPT_ENVIRONMENT if name in os.environ}
    environment.update(
        PYTHONHASHSEED="0",
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return environment


class _Helper:
    """One helper interpreter running `source`, and the pipe protocol to it (one JSON line per job each way)."""

    def __init__(self, source: str, arguments: Sequence[str], cwd: str) -> None:
        self.source = source
        self.arguments = list(arguments)
        self.cwd = cwd
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        """Start a fresh helper interpreter (isolated mode, stripped environment, its own session)."""
        return subprocess.Popen(
            [sys.executable, "-I", "-c", self.source, *self.arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=sandbox_environment(),
            cwd=self.cwd,
            start_new_session=True,
            text=True,
        )

    def run(self, request: dict) -> dict:
        """Send one job and wait for its result; a dead helper is restarted and the job reported as an error."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except (BrokenPipeError, OSError) as error:
            line, failure = "", repr(error)
        else:
            failure = "the helper process exited"
        if line:
            return json.loads(line)
        self.close()
        self.process = self._start()
        return {"status": ERROR, "tests_passed": [], "error": f"sandbox helper failed: {failure}", "seconds": 0.0}

    def close(self) -> None:
        """Stop the helper (closing its stdin ends its loop; kill it if it does not stop)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class HelperPool:
    """Up to `workers` helper interpreters running `source`; `map` sends each request to a free one.

    A helper reads one JSON request a line from stdin and answers one JSON line on stdout. Helpers run with
    `python -I` (no user site, no current directory on sys.path) and `sandbox_environment()` (no secrets).
    """

    def __init__(
        self, source: str, arguments: Sequence[str] = (), workers: Optional[int] = None, cwd: Optional[str] = None
    ) -> None:
        self.source = source
        self.arguments = list(arguments)
        self.workers = max(1, workers or default_workers())
        self.cwd = cwd or tempfile.gettempdir()
        self._helpers: list[_Helper] = []

    def map(self, requests: Sequence[dict], progress: bool = True, description: str = "testing") -> list[dict]:
        """The helpers' answers to `requests`, in input order."""
        from tqdm.auto import tqdm

        if not requests:
            return []
        while len(self._helpers) < min(self.workers, len(requests)):
            self._helpers.append(_Helper(self.source, self.arguments, self.cwd))
        pending: "queue.Queue[int]" = queue.Queue()
        for index in range(len(requests)):
            pending.put(index)
        answers: list[Optional[dict]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=description, disable=not progress)
        lock = threading.Lock()

        def drain(helper: _Helper) -> None:
            while True:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
                answers[index] = helper.run(requests[index])
                with lock:
                    bar.update(1)

        threads = [threading.Thread(target=drain, args=(helper,), daemon=True) for helper in self._helpers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        bar.close()
        return [answer if answer is not None else {"status": ERROR, "error": "not run"} for answer in answers]

    def close(self) -> None:
        """Stop every helper."""
        for helper in self._helpers:
            helper.close()
        self._helpers.clear()

    def __enter__(self) -> "HelperPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Sandbox:
    """A pool of sandbox helpers; `run(jobs)` returns one `ExecutionResult` per job, in order."""

    def __init__(self, limits: Optional[SandboxLimits] = None, workers: Optional[int] = None) -> None:
        self.limits = limits or SandboxLimits()
        self.base_dir = tempfile.mkdtemp(prefix="tlora-sandbox-")
        self.pool = HelperPool(WORKER_SOURCE, [self.base_dir], workers, cwd=self.base_dir)
        self.workers = self.pool.workers

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, job: ProgramJob) -> dict:
        """The JSON request for one job, limits included."""
        return {
            "program": job.program,
            "tests": list(job.tests),
            "setup": job.setup,
            "stop_at_first_failure": job.stop_at_first_failure,
            "timeout_per_test": self.limits.timeout_per_test,
            "memory_mb": self.limits.memory_mb,
            "max_file_mb": self.limits.max_file_mb,
            "cpu_seconds": self.limits.cpu_seconds(len(job.tests)),
            "wall_seconds": self.limits.wall_seconds(len(job.tests)),
        }

    def run(
        self, jobs: Sequence[ProgramJob], progress: bool = True, description: str = "testing"
    ) -> list[ExecutionResult]:
        """Run every job in the helpers (at most `workers` at a time) and return their results in input order."""
        answers = self.pool.map([self._request(job) for job in jobs], progress=progress, description=description)
        return [
            ExecutionResult(
                status=answer.get("status", ERROR),
                tests_passed=list(answer.get("tests_passed", [])),
                error=answer.get("error"),
                seconds=float(answer.get("seconds", 0.0)),
            )
            for answer in answers
        ]

    def close(self) -> None:
        """Stop the helpers and remove their temporary directory."""
        self.pool.close()
        shutil.rmtree(self.base_dir, ignore_errors=True)


def run_programs(
    jobs: Sequence[ProgramJob],
    limits: Optional[SandboxLimits] = None,
    workers: Optional[int] = None,
    progress: bool = True,
) -> list[ExecutionResult]:
    """Run `jobs` in a fresh sandbox pool and return one result per job (see `Sandbox`)."""
    started = time.monotonic()
    with Sandbox(limits, workers) as sandbox:
        results = sandbox.run(jobs, progress=progress)
    logger.info("Ran %d programs in %.1f s on %d workers", len(jobs), time.monotonic() - started, sandbox.workers)
    return results


__all__ = [
    "ERROR",
    "FAILED",
    "PASSED",
    "TIMEOUT",
    "ExecutionResult",
    "HelperPool",
    "ProgramJob",
    "Sandbox",
    "SandboxLimits",
    "default_workers",
    "run_programs",
    "sandbox_environment",
]
