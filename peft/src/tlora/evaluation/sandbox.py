"""Run generated programs against their tests so that the program can neither write its verdict nor touch the host.

Verdict. The program and its tests never share a process. A judge (`sandbox_judge.py`, trusted, outside the
isolation) runs the task's trusted code (HumanEval's prompt, MBPP's test imports) and the tests; the program's
functions in the tests' namespace are proxies that send each call as plain data to a solver process
(`sandbox_solver.py`), which has run the program, and bring back its return value as plain data (or an opaque
handle that is only truthy or falsy). Every assertion and comparison runs in the judge on values the program cannot
override (no `__eq__` of its own, no patched builtins, no `os._exit` of the judge), and builtins or trusted names
are never replaced by the program's. The solver never sees a test, and the channel from the judge to the scorer is
in a process the program cannot see. So the most a program controlling its whole process can do is claim return
values, which the tests check. EvalPlus's checker (`evalplus.eval.untrusted_check`, in `evalplus_judge.py`) runs in
the judge the same way, on a proxy of the entry point.

Isolation. Each job gets a fresh solver under bubblewrap (`bwrap`): new PID, network, IPC, UTS, mount (and, when
not run by root, user) namespaces; a fresh /proc that shows only the sandbox's processes; no network; a private
64 MiB /tmp as working directory; read-only binds of /usr and the Python installation only (homes, data and the
project are not there); a clean environment; no inherited descriptors; uid/gid 65534 (nobody) with no
capabilities and no new privileges (under root, bwrap keeps only CAP_SETUID/CAP_SETGID for the solver to drop to
nobody before it reads the program); and memory, CPU, file-size and process-count (`RLIMIT_NPROC`, so a fork loop
stops) limits. The solver is bwrap's child in the namespace; killing bwrap at the end of the job kills the
namespace's init and with it every process the program started. Without bwrap or user namespaces the scorer
refuses to run (`SandboxUnavailableError`) unless `unsafe_execution=True` (`--unsafe_execution`), which runs the
solver as a plain child process: the verdict stays unforgeable, but the program can reach the host.

Cost. The judges stay warm (`workers` of them, one job at a time each, a forked child per job); each job starts a
fresh namespace and interpreter, about 0.1-0.2 s of CPU where forking a warm helper cost milliseconds (40 HumanEval
canonical solutions on a busy 2-core machine: 3.8 s instead of 0.6 s). A long-lived namespace per worker would be
cheaper, but a process the program left behind could then reach the next job's solver; a fresh one cannot.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Optional

logger = logging.getLogger(__name__)

PASSED = "passed"
FAILED = "failed"
TIMEOUT = "timeout"
ERROR = "error"  # the sandbox itself failed (helper died); says nothing about the program

# Environment variables the helpers keep; everything else (API keys included) is dropped.
KEPT_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")

JUDGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_judge.py")
EVALPLUS_JUDGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evalplus_judge.py")
NOBODY = 65534  # the uid and gid programs run as
SYSTEM_DIRECTORIES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime")
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; `make install-test` does it) on a kernel that "
    "allows user namespaces (sysctl user.max_user_namespaces > 0; kernel.unprivileged_userns_clone=1 where it "
    "exists), or pass --unsafe_execution (unsafe_execution=True) to run generated code without isolation, only "
    "for code you trust"
)


class SandboxUnavailableError(RuntimeError):
    """The isolation that generated code needs is not available on this machine."""


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
    max_processes: int = 32  # RLIMIT_NPROC for the program's user: a fork loop stops here
    tmp_mb: int = 64  # the private /tmp
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
    """A program and its tests: `setup` runs after the program (e.g. test imports), then each test in order.

    The tests run in the judge, beside trusted `context` (HumanEval's prompt: its imports and helper functions) and
    `setup`; the program's `entry_points`, and whatever else the tests use that neither defines, are the program's.
    """

    program: str
    tests: list[str]
    setup: str = ""
    stop_at_first_failure: bool = True
    context: str = ""
    entry_points: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class Isolation:
    """How solvers start: the bubblewrap command prefix (empty when unsafe), the uid to drop to, and a description."""

    prefix: tuple[str, ...]
    drop_to: Optional[int]
    unsafe: bool
    description: str


def python_directories() -> list[str]:
    """The directories of this Python installation (virtual environment and base), as given and resolved."""
    candidates = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    directories = []
    for path in candidates:
        for form in (os.path.abspath(path), os.path.realpath(path)):
            if os.path.isdir(form) and form not in directories:
                directories.append(form)
    return directories


def read_only_binds() -> list[str]:
    """bubblewrap arguments that show the system and Python directories read-only, and nothing else of the host."""
    arguments: list[str] = []
    for path in SYSTEM_DIRECTORIES:
        if os.path.islink(path):
            arguments += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            arguments += ["--ro-bind", path, path]
    for path in SYSTEM_FILES:
        if os.path.exists(path):
            arguments += ["--ro-bind", path, path]
    covered = [path for path in SYSTEM_DIRECTORIES if os.path.isdir(path)]
    created: set[str] = {"/tmp"}  # the sandbox's own tmpfs, mounted before these binds
    for path in sorted(python_directories(), key=len):
        if any(path == done or path.startswith(done.rstrip("/") + "/") for done in covered):
            continue
        parents = []
        parent = os.path.dirname(path)
        while parent not in ("/", "") and parent not in created:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for parent in reversed(parents):  # bubblewrap would create them 0700, unreadable for the sandbox's user
            arguments += ["--perms", "0755", "--dir", parent]
            created.add(parent)
        arguments += bind_for_others(path)
        covered.append(path)
    return arguments


def bind_for_others(path: str, depth: int = 0) -> list[str]:
    """Read-only binds of `path` that uid 65534 can read: a directory closed to others (`mktemp -d` makes one 0700,
    and CI's virtual environment is one) is recreated 0755 in the sandbox with its entries bound inside it."""
    mode = os.stat(path).st_mode
    if not stat.S_ISDIR(mode) or mode & 0o005 == 0o005 or depth >= 4:
        return ["--ro-bind", path, path]
    arguments = ["--perms", "0755", "--dir", path]
    for entry in sorted(os.listdir(path)):
        child = os.path.join(path, entry)
        if os.path.islink(child):
            arguments += ["--symlink", os.readlink(child), child]
        else:
            arguments += bind_for_others(child, depth + 1)
    return arguments


def bubblewrap_prefix(bwrap: str, limits: SandboxLimits) -> tuple[list[str], Optional[int]]:
    """The bubblewrap command that isolates one solver, and the uid the solver drops to (when run by root)."""
    command = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc"]
    command += ["--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:  # no user namespace: the solver becomes uid 65534 of the host, with no capabilities
        command += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        drop_to: Optional[int] = NOBODY
    else:
        command += ["--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY)]
        drop_to = None
    # The private /tmp first, then the read-only binds on top of it: a virtual environment under /tmp (CI's is) stays
    # visible instead of being hidden by the tmpfs.
    command += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(limits.tmp_mb * 1024 * 1024)]
    command += ["--tmpfs", "/tmp"]
    command += read_only_binds()
    command += ["--chdir", "/tmp", "--clearenv"]
    for name, value in {**sandbox_environment(), "PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp"}.items():
        command += ["--setenv", name, value]
    return command, drop_to


PROBE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_probe.py")


def probe_source() -> str:
    """The probe's source text (`sandbox_probe.py`), passed with `-c`: the project is not mounted in the sandbox."""
    with open(PROBE_PATH, encoding="utf-8") as handle:
        return handle.read()


@lru_cache(maxsize=None)
def isolation_problem(prefix: tuple[str, ...], drop_to: Optional[int]) -> Optional[str]:
    """Why solvers cannot start under `prefix` (None when a probe ran isolated, as uid 65534, in a PID namespace)."""
    drop = ["--drop-to", str(drop_to)] if drop_to is not None else []
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", probe_source(), *drop],
            capture_output=True,
            text=True,
            timeout=60,
            env=sandbox_environment(),
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"starting bubblewrap failed: {error}"
    fields = probe.stdout.split()
    if probe.returncode != 0 or len(fields) != 3:
        return f"bubblewrap failed (exit status {probe.returncode}): {probe.stderr.strip()[-500:] or probe.stdout}"
    uid, pid, descriptors = (int(field) for field in fields)
    if uid != NOBODY or pid > 10 or descriptors > 4:
        return f"the probe ran as uid {uid}, pid {pid}, with {descriptors} descriptors: not isolated"
    return None


def resolve_isolation(limits: SandboxLimits, unsafe_execution: bool = False) -> Isolation:
    """The isolation solvers run in: bubblewrap when it works here; else no isolation if `unsafe_execution`, else a
    `SandboxUnavailableError` that says what is missing and what to do."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        problem = "bubblewrap (bwrap) is not installed"
    else:
        prefix, drop_to = bubblewrap_prefix(bwrap, limits)
        problem = isolation_problem(tuple(prefix), drop_to)
        if problem is None:
            description = "bubblewrap: new PID, network, mount, IPC and UTS namespaces; uid 65534"
            return Isolation(tuple(prefix), drop_to, False, description)
    if unsafe_execution:
        logger.warning("--unsafe_execution: generated code runs WITHOUT isolation (%s)", problem)
        return Isolation((), None, True, f"none (--unsafe_execution; {problem})")
    raise SandboxUnavailableError(
        f"Generated code cannot be isolated on this machine: {problem}. To score code safely, {INSTALL_HINT}."
    )


def helper_config(isolation: Isolation, work_dir: str) -> str:
    """The JSON configuration the judge helpers start solvers with."""
    return json.dumps(
        {
            "prefix": list(isolation.prefix),
            "drop_to": isolation.drop_to,
            "python": sys.executable,
            "environment": sandbox_environment(),
            "work_dir": work_dir,
        }
    )


class _Helper:
    """One helper interpreter (`python -I` + `program`), and the pipe protocol to it (one JSON line per job each way)."""

    def __init__(self, program: Sequence[str], cwd: str) -> None:
        self.program = list(program)
        self.cwd = cwd
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        """Start a fresh helper interpreter (isolated mode, stripped environment, its own session)."""
        return subprocess.Popen(
            [sys.executable, "-I", *self.program],
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
    """Up to `workers` helper interpreters running `program` (`[script, argument, ...]`); `map` sends
    each request to a free one.

    A helper reads one JSON request a line from stdin and answers one JSON line on stdout. Helpers run with
    `python -I` (no user site, no script directory or current directory on sys.path) and `sandbox_environment()`
    (no secrets). They run trusted code only: generated code runs in the solvers they start (see the module).
    """

    def __init__(self, program: Sequence[str], workers: Optional[int] = None, cwd: Optional[str] = None) -> None:
        self.program = list(program)
        self.workers = max(1, workers or default_workers())
        self.cwd = cwd or tempfile.gettempdir()
        self._helpers: list[_Helper] = []

    def map(self, requests: Sequence[dict], progress: bool = True, description: str = "testing") -> list[dict]:
        """The helpers' answers to `requests`, in input order."""
        from tqdm.auto import tqdm

        if not requests:
            return []
        while len(self._helpers) < min(self.workers, len(requests)):
            self._helpers.append(_Helper(self.program, self.cwd))
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

    def __init__(
        self, limits: Optional[SandboxLimits] = None, workers: Optional[int] = None, unsafe_execution: bool = False
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.isolation = resolve_isolation(self.limits, unsafe_execution)
        self.base_dir = tempfile.mkdtemp(prefix="tlora-sandbox-")
        self.pool = HelperPool([JUDGE_PATH, helper_config(self.isolation, self.base_dir)], workers, cwd=self.base_dir)
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
            "context": job.context,
            "entry_points": list(job.entry_points),
            "stop_at_first_failure": job.stop_at_first_failure,
            "timeout_per_test": self.limits.timeout_per_test,
            "memory_mb": self.limits.memory_mb,
            "max_file_mb": self.limits.max_file_mb,
            "max_processes": self.limits.max_processes,
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
    unsafe_execution: bool = False,
) -> list[ExecutionResult]:
    """Run `jobs` in a fresh sandbox pool and return one result per job (see `Sandbox`)."""
    started = time.monotonic()
    with Sandbox(limits, workers, unsafe_execution) as sandbox:
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
    "Isolation",
    "ProgramJob",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailableError",
    "default_workers",
    "helper_config",
    "resolve_isolation",
    "run_programs",
    "sandbox_environment",
]
