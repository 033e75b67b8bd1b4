"""The untrusted side of the code sandbox: defines one generated program and answers calls to its functions.

Runs inside the isolation (see `sandbox.py`) as `python -I -c <this file's text>`, standard library only. It never
sees a test: the judge (`sandbox_judge.py`, outside the isolation) sends the program, then asks for calls such as
`add(2, 3)` and gets back plain data. Whatever this process writes is at most a claim about a return value, which
the judge checks itself, so the program gaining full control of this process wins it nothing.

Protocol: frames of a 4-byte big-endian length and a UTF-8 JSON object, on descriptors 3 (in) and 4 (out); 0, 1
and 2 point to /dev/null. Values travel in the tagged encoding of `encode` / `decode` (shared with the judge).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import resource
import signal
import struct
import sys
import traceback

ERROR_CHARS = 2000
MAX_FRAME = 64 * 1024 * 1024
MAX_DEPTH = 200
BIG_INT_BITS = 4000  # ints above this are sent in hex (decimal conversion of huge ints is limited in Python 3.11)
PROTOCOL_IN, PROTOCOL_OUT = 3, 4


class SandboxTimeout(BaseException):
    """The CPU budget of a call ran out; a BaseException so that `except Exception` in the program cannot hide it."""


# ----------------------------------------------------------------------------------------------------------------
# Values (shared with the judge, which imports this module)


class Unsendable(TypeError):
    """A value outside the plain types (the judge never sends one)."""


def encode(value, handles=None, depth: int = 0):
    """`value` as JSON-ready data: plain types tagged, anything else a handle (solver) or `Unsendable` (judge)."""
    if depth > MAX_DEPTH:
        raise Unsendable("nested too deeply")
    if value is None or type(value) in (bool, str):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        value = int(value)
        return {"i": hex(value)} if value.bit_length() > BIG_INT_BITS else value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, complex):
        return {"c": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"b": bytes(value).hex()}
    inner = lambda items: [encode(item, handles, depth + 1) for item in items]  # noqa: E731
    if isinstance(value, list):
        return inner(value)
    if isinstance(value, tuple):
        return {"t": inner(value)}
    if isinstance(value, frozenset):
        return {"f": inner(value)}
    if isinstance(value, set):
        return {"s": inner(value)}
    if isinstance(value, dict):
        return {
            "d": [[encode(key, handles, depth + 1), encode(item, handles, depth + 1)] for key, item in value.items()]
        }
    return encode_other(value, handles, depth)


def encode_other(value, handles, depth: int):
    """NumPy scalars as Python numbers, judge-side handles as references, anything else a handle (solver only)."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return encode(value.item(), handles, depth + 1)
    handle = getattr(value, "sandbox_handle", None)
    if handles is None:
        if isinstance(handle, int):
            return {"h": handle}
        raise Unsendable(f"a {type(value).__name__} cannot be sent into the sandbox")
    handles.append(value)
    try:
        truthy = bool(value)
    except BaseException:
        truthy = True
    return {"o": [len(handles) - 1, type(value).__name__, truthy]}


def decode(data, handles=None, make_object=None):
    """The value `encode` wrote; handles become `handles[i]` (solver) or `make_object(...)` (judge)."""
    if isinstance(data, list):
        return [decode(item, handles, make_object) for item in data]
    if not isinstance(data, dict):
        return data
    ((tag, body),) = data.items()
    if tag == "t":
        return tuple(decode(item, handles, make_object) for item in body)
    if tag in ("s", "f"):
        items = (decode(item, handles, make_object) for item in body)
        return set(items) if tag == "s" else frozenset(items)
    if tag == "d":
        return {decode(key, handles, make_object): decode(item, handles, make_object) for key, item in body}
    if tag == "i":
        return int(body, 16)
    if tag == "c":
        return complex(float(body[0]), float(body[1]))
    if tag == "b":
        return bytes.fromhex(body)
    if tag == "h" and handles is not None:
        return handles[int(body)]
    if tag == "o" and make_object is not None:
        return make_object(int(body[0]), str(body[1]), bool(body[2]))
    raise ValueError(f"unknown value tag {tag!r}")


def read_frame(fd: int, read=os.read) -> dict:
    """One frame from `fd` (EOFError when the other side is gone)."""
    header = read_exactly(fd, 4, read)
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes exceeds the limit of {MAX_FRAME}")
    return json.loads(read_exactly(fd, size, read).decode("utf-8"))


def read_exactly(fd: int, size: int, read=os.read) -> bytes:
    """`size` bytes from `fd`."""
    chunks, missing = [], size
    while missing:
        chunk = read(fd, min(missing, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def frame(message: dict) -> bytes:
    """`message` as one frame."""
    data = json.dumps(message).encode("utf-8")
    return struct.pack(">I", len(data)) + data


# ----------------------------------------------------------------------------------------------------------------
# The solver process


def short_error(error: BaseException) -> str:
    """The last line of a traceback, bounded."""
    return "".join(traceback.format_exception_only(type(error), error)).strip()[-ERROR_CHARS:]


def set_limits(request: dict) -> None:
    """Memory, CPU, file size, process count and descriptor limits, no core files (hard limits: cannot be raised)."""
    memory = int(request["memory_mb"]) * 1024 * 1024
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        resource.setrlimit(getattr(resource, name), (memory, memory))
    cpu = int(request["cpu_seconds"]) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    size = int(request["max_file_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    processes = int(request["max_processes"])
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


# os functions the solver disables before it defines a program (see `guard`).
DISABLED_OS_FUNCTIONS = (
    "kill",
    "killpg",
    "system",
    "remove",
    "removedirs",
    "rmdir",
    "unlink",
    "rename",
    "renames",
    "replace",
    "truncate",
    "fork",
    "forkpty",
    "setuid",
    "setgid",
    "chmod",
    "fchmod",
    "lchmod",
    "chown",
    "fchown",
    "lchown",
    "chroot",
    "fchdir",
    "chdir",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "spawnv",
    "spawnve",
    "spawnl",
    "spawnle",
    "posix_spawn",
    "posix_spawnp",
    "popen",
    "plock",
    "nice",
    "setsid",
)


def guard() -> None:
    """Disable what destroys files or spawns or signals processes, as human-eval does (defence in depth only: the
    isolation, not this, keeps the host safe)."""
    import shutil
    import subprocess

    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise PermissionError("writing files is disabled in the sandbox")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = read_only_open
    builtins.exit = builtins.quit = None
    for name in DISABLED_OS_FUNCTIONS:
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None
    for name in ("ipdb", "joblib", "psutil", "tkinter"):
        sys.modules[name] = None


class Sink(io.StringIO):
    """Swallows the program's output and refuses to be read."""

    def write(self, text):
        return len(text)

    def read(self, *args, **kwargs):
        raise OSError("stdin is not available in the sandbox")

    readline = readlines = read


class Solver:
    """The program's namespace and the calls the judge asks for."""

    def __init__(self) -> None:
        self.namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        self.handles: list = []
        self.itimer, self.getitimer, self.ITIMER_PROF = signal.setitimer, signal.getitimer, signal.ITIMER_PROF

    def arm(self, seconds: float) -> None:
        """Raise SandboxTimeout after `seconds` more CPU seconds."""

        def expired(signum, frame):
            raise SandboxTimeout("exceeded the CPU budget")

        signal.signal(signal.SIGPROF, expired)
        self.itimer(self.ITIMER_PROF, max(float(seconds), 0.001))

    def disarm(self) -> float:
        """Stop the CPU timer; the budget left."""
        left = self.getitimer(self.ITIMER_PROF)[0]
        self.itimer(self.ITIMER_PROF, 0)
        return left

    def define(self, request: dict) -> dict:
        """Run the program (and the test imports) and describe the names the judge asked about."""
        try:
            code = compile(request["program"], "solution.py", "exec")
        except BaseException as error:
            return {"ok": False, "status": "failed", "error": "program does not compile: " + short_error(error)}
        try:
            self.arm(request["cpu"])
            exec(code, self.namespace)
            if request.get("setup"):
                exec(compile(request["setup"], "setup.py", "exec"), self.namespace)
            self.disarm()
        except SandboxTimeout:
            self.disarm()
            return {
                "ok": False,
                "status": "timeout",
                "error": "defining the program: exceeded %.1f CPU seconds" % float(request["cpu"]),
            }
        except BaseException as error:
            self.disarm()
            return {"ok": False, "status": "failed", "error": "defining the program: " + short_error(error)}
        return {"ok": True, "names": {name: self.kind(name) for name in request["names"] if name in self.namespace}}

    def kind(self, name: str) -> str:
        """`module:<name>`, `callable` or `value`."""
        value = self.namespace[name]
        if type(value).__name__ == "module":
            return "module:" + str(getattr(value, "__name__", ""))
        return "callable" if callable(value) else "value"

    def answer(self, request: dict) -> dict:
        """The outcome of one call (or the value of one global) as a reply."""
        if request["op"] == "get":
            return {"value": encode(self.namespace.get(request["name"]), self.handles)}
        target = self.namespace.get(request["name"])
        args = decode(request["args"], self.handles)
        kwargs = decode(request["kwargs"], self.handles)
        budget = float(request["budget"])
        try:
            self.arm(budget)
            value = target(*args, **kwargs)
            left = self.disarm()
        except SandboxTimeout:
            self.disarm()
            return {"timeout": True, "cpu": budget}
        except BaseException as error:
            left = self.disarm()
            return {"raise": [type(error).__name__, short_error(error)], "cpu": budget - left}
        try:
            return {"value": encode(value, self.handles), "cpu": budget - left}
        except BaseException as error:
            return {"raise": ["TypeError", "the return value cannot be sent: " + short_error(error)], "cpu": 0.0}


def drop_privileges(uid: int) -> None:
    """From root (bubblewrap run by root) to `uid`, with no groups and no capabilities left."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PermissionError("the sandbox still runs as root")


def take_protocol_descriptors() -> None:
    """Move the channel to descriptors 3/4, point 0-2 at /dev/null, close everything else."""
    incoming, outgoing = os.dup(0), os.dup(1)
    os.dup2(incoming, PROTOCOL_IN)
    os.dup2(outgoing, PROTOCOL_OUT)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(PROTOCOL_OUT + 1, 65536)


def sender(write):
    """A function that writes one reply frame to the judge."""

    def send(message: dict) -> None:
        data = frame(message)
        while data:
            data = data[write(PROTOCOL_OUT, data) :]

    return send


def main() -> None:
    """Define the program, then answer calls until the judge closes the channel."""
    if len(sys.argv) > 2 and sys.argv[1] == "--drop-to":
        drop_privileges(int(sys.argv[2]))
    take_protocol_descriptors()
    read = os.read
    send = sender(os.write)
    solver = Solver()
    request = read_frame(PROTOCOL_IN, read)
    set_limits(request)
    sys.stdin = sys.stdout = sys.stderr = Sink()
    guard()
    send(solver.define(request))
    while True:
        try:
            request = read_frame(PROTOCOL_IN, read)
        except EOFError:
            break
        send(solver.answer(request))
    os._exit(0)


if __name__ == "__main__":
    main()
