"""A hostile program can neither write its own verdict nor touch the host; without isolation the scorer refuses."""

from __future__ import annotations

import gzip
import json
import os
import random
import runpy
import signal
import socket
import subprocess
import sys
import time

import pytest
from tlora.evaluation import sandbox
from tlora.evaluation.code import score_code_predictions
from tlora.evaluation.code_data import load_code_tasks, reference_predictions
from tlora.evaluation.sandbox import ProgramJob, Sandbox, SandboxLimits, SandboxUnavailableError

FAST = SandboxLimits(timeout_per_test=2.0, memory_mb=512, wall_factor=2.0, slack_seconds=2.0)

# Writes a forged "all passed" result to every descriptor it has, then ends the process before any test runs.
FORGE = """
import json, os
for fd in range(3, 64):
    for message in ({"status": "passed", "tests_passed": [True], "error": None},
                    {"ok": True, "names": {}}, {"value": True}):
        data = json.dumps(message).encode()
        for frame in (data + b"\\n", len(data).to_bytes(4, "big") + data):
            try:
                os.write(fd, frame)
            except OSError:
                pass
os._exit(0)
"""


@pytest.fixture(scope="module")
def pool():
    """One sandbox for the module (two workers)."""
    with Sandbox(FAST, workers=2) as pool:
        yield pool


def run_one(pool, program: str, tests=("assert True",)):
    """The result of one program."""
    return pool.run([ProgramJob(program, list(tests))], progress=False)[0]


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if entry.isdigit() and marker.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def survivors(marker: str, wait: float = 5.0) -> list[int]:
    """Processes holding `marker` still alive after up to `wait` seconds (killed here, so that none outlives us)."""
    deadline = time.monotonic() + wait
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    found = processes_with(marker)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return found


def started_environment(pid: int, wait: float = 5.0) -> bytes:
    """/proc/<pid>/environ once the process has started (empty before its exec completes)."""
    deadline = time.monotonic() + wait
    while True:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            content = handle.read()
        if content or time.monotonic() > deadline:
            return content
        time.sleep(0.05)


def humaneval_tasks(shared_data, count: int = 1):
    """The first `count` HumanEval problems."""
    return load_code_tasks("humaneval", str(shared_data / "humaneval" / "HumanEval.jsonl.gz"), limit=count)


def test_a_forged_pass_written_to_every_descriptor_scores_zero(shared_data):
    tasks = humaneval_tasks(shared_data)
    rows = [{"task_id": "HumanEval/0", "completion": "    return False\n" + FORGE}]
    result = score_code_predictions("humaneval", rows, tasks, allow_subset=True, progress=False, workers=1)
    assert result["pass@1"] == 0.0 and result["records"][0]["status"] == "failed"
    assert result["unsafe_execution"] is False and result["sandbox"].startswith("bubblewrap")
    assert (
        score_code_predictions(
            "humaneval", reference_predictions("humaneval", tasks), tasks, allow_subset=True, progress=False, workers=1
        )["pass@1"]
        == 1.0
    )


def test_return_values_cannot_fake_equality_or_patch_the_tests_builtins(pool):
    always_equal = "class Equal:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Equal()\n"
    assert run_one(pool, always_equal, ["assert f(1) == 2"]).status == "failed"
    patched = "import builtins\nbuiltins.abs = lambda value: 0\ndef f(x):\n    return 100\n"
    assert run_one(pool, patched, ["assert abs(f(1) - 2) < 1e-6"]).status == "failed"
    assert run_one(pool, "def f(x):\n    return x + 1\n", ["assert abs(f(1) - 2) < 1e-6"]).passed


def test_posix_system_and_file_writes_do_not_reach_the_host(pool, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    created = [tmp_path / name for name in ("system.txt", "open.txt", "fileio.txt")]
    programs = [
        f"import posix\nposix.system('touch {created[0]}; echo gone > {victim}')\n",
        f"import os\nfd = os.open({str(created[1])!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
        f"import os\nfd = os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)\nos.write(fd, b'gone')\n",
        f"import _io\n_io.FileIO({str(created[2])!r}, 'w').write(b'x')\n",
        f"import _io\n_io.FileIO({str(victim)!r}, 'w').write(b'gone')\n",
        f"import posix\nposix.unlink({str(victim)!r})\n",
    ]
    for program in programs:
        assert run_one(pool, program + "def f():\n    return 0\n", ["assert f() == 1"]).status == "failed", program
    assert victim.read_text() == "data" and [path.exists() for path in created] == [False, False, False]


def test_a_forked_setsid_child_does_not_outlive_the_job(pool):
    marker = f"{random.randint(10**6, 10**7)}.25"
    program = (
        "import posix\nif posix.fork() == 0:\n    posix.setsid()\n"
        f"    posix.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "def f():\n    return 0\n"
    )
    assert run_one(pool, program, ["assert f() == 1"]).status == "failed"
    assert survivors(marker) == []


def test_a_fork_loop_stops_at_the_process_limit_and_dies_with_the_job(pool):
    marker = f"{random.randint(10**6, 10**7)}.5"
    program = (
        "import posix\ncount = 0\nfor _ in range(200):\n    try:\n        pid = posix.fork()\n"
        "    except OSError:\n        break\n"
        f"    if pid == 0:\n        posix.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    count += 1\n"
        "def forks():\n    return count\n"
    )
    result = run_one(pool, program, ["assert forks() == 200"])
    assert result.status == "failed" and "assert" in result.error.lower()
    assert survivors(marker) == []


def test_other_processes_and_their_environments_are_invisible(monkeypatch):
    secret = "sk-fake-secret-123"
    monkeypatch.setenv("TLORA_FAKE_JUDGE_API_KEY", secret)
    # /proc/<pid>/environ shows a process's environment as it started: a process started with the key stands for
    # a scorer that was given one
    holder = subprocess.Popen(["sleep", "60"], env={**os.environ, "TLORA_FAKE_JUDGE_API_KEY": secret})
    try:
        assert secret.encode() in started_environment(holder.pid)  # readable from the host
        program = (
            "import os\n"
            "def environment(pid):\n    return open('/proc/%d/environ' % pid, 'rb').read().decode()\n"
            "def visible_processes():\n    return sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "def identity():\n    return (os.getuid(), os.getgid(), sorted(os.environ))\n"
        )
        jobs = [
            ProgramJob(program, [f"assert {secret!r} in environment({holder.pid})"]),
            ProgramJob(program, [f"assert {os.getpid()} in visible_processes()"]),
            ProgramJob(
                program,
                [
                    "assert identity()[0] == 65534 and identity()[1] == 65534",
                    "assert not any('KEY' in name for name in identity()[2])",
                    "assert max(visible_processes()) < 10",
                ],
            ),
        ]
        with Sandbox(FAST, workers=1) as fresh:  # helpers started after the key was set
            results = fresh.run(jobs, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert [result.status for result in results] == ["failed", "failed", "passed"], [r.error for r in results]
    assert all(secret not in (result.error or "") for result in results)


def test_the_network_is_unreachable(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        program = (
            "import socket\n"
            f"def connect():\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n    return True\n"
        )
        assert run_one(pool, program, ["assert connect()"]).status == "failed"
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_missing_isolation_refuses_to_score_unless_unsafe_execution(shared_data, monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda prefix, drop_to: "user namespaces are disabled")
    tasks = humaneval_tasks(shared_data)
    predictions = reference_predictions("humaneval", tasks)
    with pytest.raises(SandboxUnavailableError) as error:
        score_code_predictions("humaneval", predictions, tasks, allow_subset=True, progress=False, workers=1)
    assert "user namespaces are disabled" in str(error.value) and "--unsafe_execution" in str(error.value)
    assert "apt-get install bubblewrap" in str(error.value)
    result = score_code_predictions(
        "humaneval", predictions, tasks, allow_subset=True, progress=False, workers=1, unsafe_execution=True
    )
    assert result["pass@1"] == 1.0 and result["unsafe_execution"] is True
    assert result["sandbox"] == "none (--unsafe_execution; user namespaces are disabled)"


def test_eval_code_takes_unsafe_execution_and_records_it(shared_data, repo_root, monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)  # no bwrap on this "machine"
    predictions = tmp_path / "predictions.jsonl"
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as handle:
        first = json.loads(handle.readline())
    predictions.write_text(json.dumps({"task_id": "HumanEval/0", "completion": first["canonical_solution"]}) + "\n")
    output = tmp_path / "humaneval.json"
    arguments = [
        "--dataset",
        "humaneval",
        "--data_file",
        str(shared_data / "humaneval" / "HumanEval.jsonl.gz"),
        "--predictions",
        str(predictions),
        "--output",
        str(output),
        "--limit",
        "1",
        "--protocol",
        "robust",
    ]
    monkeypatch.setattr(sys, "argv", ["code/eval_code.py", *arguments])
    with pytest.raises(SandboxUnavailableError, match="bubblewrap \\(bwrap\\) is not installed"):
        runpy.run_path(str(repo_root / "code" / "eval_code.py"), run_name="__main__")
    assert not output.exists()
    monkeypatch.setattr(sys, "argv", ["code/eval_code.py", *arguments, "--unsafe_execution"])
    runpy.run_path(str(repo_root / "code" / "eval_code.py"), run_name="__main__")
    result = json.loads(output.read_text())
    assert result["unsafe_execution"] is True and result["pass@1"] == 1.0
