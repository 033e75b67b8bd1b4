"""The sandbox that runs generated programs: limits, isolation from the scorer, and what counts as passing."""

from __future__ import annotations

import os

import pytest
from tlora.evaluation.sandbox import ProgramJob, Sandbox, SandboxLimits, run_programs

FAST = SandboxLimits(timeout_per_test=1.0, memory_mb=512, wall_factor=2.0, slack_seconds=1.0)


@pytest.fixture(scope="module")
def sandbox():
    """One helper pool for the module (two workers)."""
    with Sandbox(FAST, workers=2) as pool:
        yield pool


def run_one(sandbox, program: str, tests=("assert True",), setup: str = ""):
    """The result of one program."""
    return sandbox.run([ProgramJob(program, list(tests), setup)], progress=False)[0]


def test_a_correct_program_passes_every_test(sandbox):
    result = run_one(sandbox, "def f(x):\n    return x + 1\n", ["assert f(1) == 2", "assert f(2) == 3"])
    assert result.passed and result.tests_passed == [True, True] and result.error is None


def test_a_failing_assertion_fails_and_names_the_test(sandbox):
    result = run_one(sandbox, "def f(x):\n    return x\n", ["assert f(1) == 1", "assert f(1) == 2, 'off by one'"])
    assert result.status == "failed" and result.tests_passed == [True, False]
    assert result.error == "test 1: AssertionError: off by one"


def test_setup_runs_between_program_and_tests(sandbox):
    assert run_one(
        sandbox,
        "def area(r):\n    return 3.14159 * r * r\n",
        ["assert math.isclose(area(1), 3.14159)"],
        setup="import math",
    ).passed


def test_an_infinite_loop_times_out_on_cpu_time(sandbox):
    result = run_one(sandbox, "def f():\n    while True:\n        pass\n", ["f()"])
    assert result.status == "timeout" and "CPU seconds" in result.error
    assert result.seconds < 10


def test_a_sleeping_program_hits_the_wall_clock_backstop(sandbox):
    result = run_one(sandbox, "import time\ntime.sleep(60)\n")
    assert result.status == "timeout" and "wall-clock" in result.error
    assert result.seconds < FAST.wall_seconds(1) + 5


def test_memory_is_limited(sandbox):
    result = run_one(sandbox, "blob = bytearray(2 * 1024 ** 3)\n")
    assert result.status == "failed" and "MemoryError" in result.error


def test_exiting_early_is_not_a_pass(sandbox):
    assert run_one(sandbox, "import sys\nsys.exit(0)\n").status == "failed"
    assert run_one(sandbox, "import os\nos._exit(0)\n").status == "failed"


def test_syntax_errors_fail_cleanly(sandbox):
    result = run_one(sandbox, "def f(:\n    pass\n")
    assert result.status == "failed" and "does not compile" in result.error


def test_destructive_calls_are_disabled_and_files_cannot_be_written(sandbox, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    for program in (
        f"import os\nos.remove({str(victim)!r})\n",
        f"open({str(victim)!r}, 'w').write('gone')\n",
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    ):
        assert run_one(sandbox, program).status == "failed", program
    assert victim.read_text() == "data"
    assert run_one(sandbox, "import os\nassert os.getcwd() != " + repr(os.getcwd()) + "\n").passed


def test_secrets_in_the_environment_do_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    jobs = [ProgramJob("import os\n", ["assert 'OPENAI_API_KEY' not in os.environ", "assert os.environ.get('PATH')"])]
    assert run_programs(jobs, FAST, workers=1, progress=False)[0].passed


def test_program_output_is_swallowed_and_numpy_imports(sandbox):
    pytest.importorskip("numpy")
    result = run_one(
        sandbox,
        "import numpy as np\nprint('x' * 100000)\ndef f():\n    return int(np.arange(4).sum())\n",
        ["assert f() == 6"],
    )
    assert result.passed, result.error


def test_results_come_back_in_order_from_parallel_workers(sandbox):
    jobs = [ProgramJob(f"value = {index}\n", [f"assert value == {index}"]) for index in range(20)]
    jobs[7] = ProgramJob("value = -1\n", ["assert value == 7"])
    results = sandbox.run(jobs, progress=False)
    assert [result.passed for result in results] == [index != 7 for index in range(20)]


def test_the_scorer_process_is_untouched(sandbox):
    marker = "TLORA_SANDBOX_MARKER"
    run_one(sandbox, f"import os\nos.environ[{marker!r}] = '1'\nimport builtins\nbuiltins.len = None\n")
    assert marker not in os.environ and len([1]) == 1


def test_a_python_directory_closed_to_others_is_reopened_with_its_entries_bound(tmp_path):
    """CI's virtual environment comes from `mktemp -d` (0700): bound as it is, uid 65534 could not read its
    site-packages, and `import numpy` failed inside the sandbox."""
    from tlora.evaluation.sandbox import bind_for_others

    closed = tmp_path / "venv"
    (closed / "lib").mkdir(parents=True, mode=0o755)
    (closed / "pyvenv.cfg").write_text("home = /usr/bin\n")
    os.symlink("lib", closed / "lib64")
    closed.chmod(0o700)
    assert bind_for_others(str(closed)) == [
        *["--perms", "0755", "--dir", str(closed)],
        *["--ro-bind", str(closed / "lib"), str(closed / "lib")],
        *["--symlink", "lib", str(closed / "lib64")],
        *["--ro-bind", str(closed / "pyvenv.cfg"), str(closed / "pyvenv.cfg")],
    ]
    closed.chmod(0o755)
    assert bind_for_others(str(closed)) == ["--ro-bind", str(closed), str(closed)]
