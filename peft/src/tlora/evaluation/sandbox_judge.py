"""The trusted side of the code sandbox: runs a job's tests and decides its verdict; the program runs elsewhere.

Run by `sandbox.Sandbox` as helper processes (`python -I sandbox_judge.py CONFIG`, standard library only), one job
at a time from stdin, one JSON result per line on stdout. For each job the helper forks a judge child, which starts
a solver (`sandbox_solver.py`) inside the isolation named by CONFIG, sends it the program, then runs the trusted
code (the task's prompt, the test imports and the tests) in its own namespace where the program's functions are
proxies: each call travels to the solver as plain data and its return value comes back as plain data (`None`,
`bool`, `int`, `float`, `complex`, `str`, `bytes`, `list`, `tuple`, `dict`, `set`, `frozenset`; anything else is
an opaque handle that is only truthy or falsy). Every comparison happens here, on values the program cannot
override, so a program that controls its whole process can claim return values and nothing more. Builtins and the
trusted code's own names are never replaced by the program's definitions.

The EvalPlus judge (`evalplus_judge.py`) loads this file by path and uses `open_program` and `Calls` the same way.
"""

from __future__ import annotations

import builtins
import fcntl
import importlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, Optional

if __package__:
    from . import sandbox_solver as codec
else:  # run as a script or loaded by path: the solver module sits next to this file
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "tlora_sandbox_solver", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_solver.py")
    )
    codec = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(codec)

ERROR_CHARS = 2000
JUDGE_GRACE_SECONDS = 10.0  # how long past a job's wall budget the helper waits for its judge child
# Modules a program's global may stand for in the tests (MBPP/596 uses the program's `sys`): the judge imports its
# own copy, never one the program names outside the standard library or one with side effects on import.
UNSAFE_MODULES = {
    "antigravity",
    "this",
    "webbrowser",
    "turtle",
    "turtledemo",
    "tkinter",
    "idlelib",
    "__hello__",
    "__phello__",
    "pydoc",
    "code",
    "pdb",
}


class WallClockTimeout(BaseException):
    """The job's wall-clock budget ran out while waiting for the solver."""


class SolverGone(BaseException):
    """The solver process ended (exit, crash, memory limit) or sent something that is not a reply."""


class SandboxTimeout(BaseException):
    """A test's CPU budget ran out in the solver; a BaseException so that test code cannot catch it."""


class SandboxedError(Exception):
    """An exception the program raised whose type is not a builtin exception."""


class SandboxObject:
    """A value that stayed in the solver: only its truthiness travelled; equal to nothing but itself."""

    def __init__(self, handle: int, type_name: str, truthy: bool) -> None:
        self.sandbox_handle, self.type_name, self.truthy = handle, type_name, truthy

    def __bool__(self) -> bool:
        return self.truthy

    def __repr__(self) -> str:
        return f"<{self.type_name} object in the sandbox>"


def short_error(error: BaseException) -> str:
    """The last line of a traceback, bounded."""
    return codec.short_error(error)


# ----------------------------------------------------------------------------------------------------------------
# The solver process


def solver_command(config: dict) -> list[str]:
    """The command that starts a solver: the isolation prefix, then the interpreter running the solver's source."""
    with open(codec.__file__, encoding="utf-8") as handle:
        source = handle.read()
    drop = ["--drop-to", str(config["drop_to"])] if config.get("drop_to") is not None else []
    return [*config["prefix"], config["python"], "-I", "-c", source, *drop]


class SolverProcess:
    """One solver, started in the isolation, and the framed channel to it (every wait bounded by `deadline`)."""

    def __init__(self, config: dict, deadline: float) -> None:
        self.deadline = deadline
        self.work_dir = None if config["prefix"] else tempfile.mkdtemp(dir=config.get("work_dir"))
        self.process = subprocess.Popen(
            solver_command(config),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=config["environment"],
            cwd=self.work_dir or "/",
            close_fds=True,
        )
        self.to_solver, self.from_solver = self.process.stdin.fileno(), self.process.stdout.fileno()
        flags = fcntl.fcntl(self.to_solver, fcntl.F_GETFL)
        fcntl.fcntl(self.to_solver, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.gone: Optional[str] = None

    def _wait(self, fd: int, writing: bool) -> None:
        """Block until `fd` is ready, or raise WallClockTimeout at the deadline."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise WallClockTimeout()
            ready = select.select([], [fd], [], remaining)[1] if writing else select.select([fd], [], [], remaining)[0]
            if ready:
                return

    def _read(self, fd: int, size: int) -> bytes:
        self._wait(fd, writing=False)
        return os.read(fd, size)

    def request(self, message: dict) -> dict:
        """Send one request and return the solver's reply."""
        if self.gone:
            raise SolverGone(self.gone)
        data = codec.frame(message)
        try:
            while data:
                self._wait(self.to_solver, writing=True)
                data = data[os.write(self.to_solver, data) :]
            reply = codec.read_frame(self.from_solver, self._read)
        except (OSError, EOFError, ValueError, UnicodeDecodeError) as error:
            self.gone = "the program ended the process before the tests finished (exit, crash or memory limit)"
            raise SolverGone(self.gone) from error
        except BaseException:  # e.g. EvalPlus's per-input alarm: the reply to this request would come out of turn
            self.gone = "an earlier call into the program was interrupted"
            raise
        if not isinstance(reply, dict):
            self.gone = "the sandboxed process sent something that is not a reply"
            raise SolverGone(self.gone)
        return reply

    def close(self) -> None:
        """Kill the solver (in the isolation, its namespace's init and with it every descendant) and clean up."""
        try:
            self.process.kill()
        except OSError:
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self.work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def open_program(config: dict, job: dict, names, deadline: float) -> tuple[SolverProcess, dict]:
    """Start a solver, define the job's program in it and learn what `names` are there: (solver, reply)."""
    solver = SolverProcess(config, deadline)
    request = {
        "op": "define",
        "program": job["program"],
        "setup": job.get("setup", ""),
        "names": sorted(names),
        "cpu": float(job["timeout_per_test"]),
    }
    for key in ("memory_mb", "cpu_seconds", "max_file_mb", "max_processes"):
        request[key] = job[key]
    try:
        return solver, solver.request(request)
    except BaseException:
        solver.close()
        raise


# ----------------------------------------------------------------------------------------------------------------
# Calls into the program


def raise_remote(type_name: str, message: str) -> None:
    """Raise, here, the exception the program raised (a builtin exception type, else SandboxedError)."""
    text = str(message)[-ERROR_CHARS:]
    prefix = f"{type_name}: "
    text = text[len(prefix) :] if text.startswith(prefix) else text
    kind = getattr(builtins, str(type_name), None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            error = kind(text)
        except Exception:
            error = SandboxedError(f"{type_name}: {text}")
    else:
        error = SandboxedError(f"{type_name}: {text}")
    raise error


class Calls:
    """Proxies for the program's functions; each call spends the current test's CPU budget."""

    def __init__(self, solver: SolverProcess, budget: float) -> None:
        self.solver = solver
        self.remaining = budget
        self.budget = budget

    def start_test(self) -> None:
        """A fresh CPU budget for the next test."""
        self.remaining = self.budget

    def call(self, name: str, args: tuple, kwargs: dict) -> Any:
        """Call the program's `name` with plain arguments; its plain return value (or its exception, raised here)."""
        if self.remaining <= 0:
            raise SandboxTimeout(f"exceeded {self.budget:.1f} CPU seconds")
        message = {
            "op": "call",
            "name": name,
            "args": codec.encode(list(args)),
            "kwargs": codec.encode(kwargs),
            "budget": self.remaining,
        }
        reply = self.solver.request(message)
        try:
            self.remaining -= max(0.0, float(reply.get("cpu", 0.0)))
        except (TypeError, ValueError):
            pass
        if reply.get("timeout"):
            self.remaining = 0.0
            raise SandboxTimeout(f"exceeded {self.budget:.1f} CPU seconds")
        if "raise" in reply:
            type_name, message_text = (list(reply["raise"]) + ["", ""])[:2]
            raise_remote(str(type_name), str(message_text))
        return self.value(reply)

    def get(self, name: str) -> Any:
        """The value of the program's global `name` (a copy; plain data or an opaque handle)."""
        return self.value(self.solver.request({"op": "get", "name": name}))

    def value(self, reply: dict) -> Any:
        """The decoded value of a reply."""
        try:
            return codec.decode(reply["value"], make_object=SandboxObject)
        except Exception as error:
            raise SolverGone(f"the sandboxed process sent a malformed value: {error!r}") from error

    def proxy(self, name: str) -> Callable:
        """A local function that calls the program's `name`."""

        def call_program(*args, **kwargs):
            return self.call(name, args, kwargs)

        call_program.__name__ = call_program.__qualname__ = name
        return call_program


# ----------------------------------------------------------------------------------------------------------------
# The tests


def global_names(code: types.CodeType) -> set[str]:
    """Every name the code (and the code nested in it) may look up globally."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= global_names(constant)
    return names


def allowed_module(name: str) -> bool:
    """Whether the judge may import `name` for the tests (standard library, no side effects on import)."""
    top = name.split(".")[0]
    return top in sys.stdlib_module_names and top not in UNSAFE_MODULES


def trusted_namespace(job: dict) -> dict:
    """The tests' namespace before the program's names: the task's context (HumanEval's prompt) and test imports."""
    namespace: dict = {"__name__": "__tests__", "__builtins__": builtins}
    if job.get("context"):
        exec(compile(job["context"], "prompt.py", "exec"), namespace)
    if job.get("setup"):
        exec(compile(job["setup"], "setup.py", "exec"), namespace)
    return namespace


def wanted_names(job: dict, namespace: dict, tests: list) -> set[str]:
    """The program's names the tests may need: the entry points, and what the tests use that nothing trusted has."""
    entry_points = set(job.get("entry_points") or ())
    referenced = set()
    for code in tests:
        if isinstance(code, types.CodeType):
            referenced |= global_names(code)
    protected = set(namespace) | set(dir(builtins))
    return entry_points | {name for name in referenced if name not in protected}


def bind_program(namespace: dict, described: dict, wanted: set, calls: Calls) -> None:
    """Put the proxies (or copies, or modules) of the program's names the tests need into their namespace."""
    for name, kind in described.items():
        if name not in wanted or not isinstance(kind, str):
            continue
        if kind == "callable":
            namespace[name] = calls.proxy(name)
        elif kind.startswith("module:"):
            module = kind[len("module:") :]
            if module == name and allowed_module(module):
                namespace[name] = importlib.import_module(module)
        else:
            namespace[name] = calls.get(name)


def compile_tests(job: dict) -> list:
    """Each test compiled, or the SyntaxError it raised."""
    compiled = []
    for index, test in enumerate(job["tests"]):
        try:
            compiled.append(compile(test, f"test_{index}.py", "exec"))
        except BaseException as error:
            compiled.append(error)
    return compiled


def run_tests(job: dict, namespace: dict, tests: list, calls: Calls) -> dict:
    """Run every test here in order (each with a fresh CPU budget in the solver); the verdict."""
    status, message, results = "passed", None, []
    for index, code in enumerate(tests):
        calls.start_test()
        try:
            if isinstance(code, BaseException):
                raise code
            exec(code, namespace)
            results.append(True)
        except (WallClockTimeout, SolverGone):
            raise
        except SandboxTimeout as error:
            results.append(False)
            if status == "passed":
                status, message = "timeout", f"test {index}: {error}"
        except BaseException as error:
            results.append(False)
            if status == "passed":
                status, message = "failed", f"test {index}: {short_error(error) or type(error).__name__}"
        if status != "passed" and job.get("stop_at_first_failure", True):
            break
    return {"status": status, "tests_passed": results, "error": message}


def judge(job: dict, config: dict) -> dict:
    """The verdict of one job: define the program in a fresh solver, then run the tests against it."""
    deadline = time.monotonic() + float(job["wall_seconds"])
    try:
        return judge_until(job, config, deadline)
    except WallClockTimeout:
        return {
            "status": "timeout",
            "tests_passed": [],
            "error": "wall-clock limit of %.1f s" % float(job["wall_seconds"]),
        }
    except SolverGone as error:
        return {"status": "failed", "tests_passed": [], "error": str(error)}


def judge_until(job: dict, config: dict, deadline: float) -> dict:
    """`judge`'s work; raises WallClockTimeout or SolverGone."""
    namespace = trusted_namespace(job)
    tests = compile_tests(job)
    wanted = wanted_names(job, namespace, tests)
    solver, reply = open_program(config, job, wanted, deadline)
    try:
        if not reply.get("ok"):
            status = reply.get("status") if reply.get("status") in ("failed", "timeout") else "failed"
            return {"status": status, "tests_passed": [], "error": str(reply.get("error"))[:ERROR_CHARS]}
        calls = Calls(solver, float(job["timeout_per_test"]))
        names = reply.get("names") if isinstance(reply.get("names"), dict) else {}
        bind_program(namespace, names, wanted, calls)
        return run_tests(job, namespace, tests, calls)
    finally:
        solver.close()


# ----------------------------------------------------------------------------------------------------------------
# The helper process


def judge_in_child(job: dict, config: dict) -> dict:
    """Run `judge` in a forked child (its own session), killed with everything it started past the budget."""
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setsid()
            # bounds what decoding the program's replies may cost here; the solver lowers it for itself
            memory = (2 * int(job["memory_mb"]) + 1024) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            try:
                result = judge(job, config)
            except WallClockTimeout:
                result = {
                    "status": "timeout",
                    "tests_passed": [],
                    "error": "wall-clock limit of %.1f s" % float(job["wall_seconds"]),
                }
            except BaseException as error:
                result = {"status": "error", "tests_passed": [], "error": "sandbox judge: " + short_error(error)}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_fd, data) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = read_until(read_fd, start + float(job["wall_seconds"]) + JUDGE_GRACE_SECONDS)
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os.waitpid(pid, 0)
    os.close(read_fd)
    try:
        result = json.loads(b"".join(chunks).decode()) if chunks is not None else None
    except ValueError:
        result = None
    if result is None:
        result = {
            "status": "timeout",
            "tests_passed": [],
            "error": "wall-clock limit of %.1f s" % float(job["wall_seconds"]),
        }
    result["seconds"] = time.monotonic() - start
    return result


def read_until(fd: int, deadline: float) -> Optional[list]:
    """Everything readable from `fd` until end of file, or None past `deadline`."""
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if not select.select([fd], [], [], remaining)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return chunks
        chunks.append(chunk)


def main() -> None:
    """Answer one job a line until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = judge_in_child(json.loads(line), config)
        except Exception as error:
            result = {"status": "error", "tests_passed": [], "error": f"sandbox helper: {error!r}", "seconds": 0.0}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
