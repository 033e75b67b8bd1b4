"""The documentation's own check: every command shown in README.md and docs/*.md names a script, module or make
target that exists, every `--flag` it passes is one that program's `--help` documents, and every local link points
to a file of the repository."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "bench" / "README.md"]
FENCE = re.compile(r"```bash\n(.*?)```", re.S)
ENVIRONMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
# Commands that run other programs than the project's (pip, git, ...) are not checked here.
PROGRAMS = ("python", "python3", "deepspeed", "make", "bash")


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks of a Markdown text, as words (continuation lines joined, comments dropped,
    `a && b`, `a; b` and pipes split into their commands)."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            command: list[str] = []
            for token in _tokens(line) + [";"]:
                if token in (";", "&&", "||", "|", "&", "(", ")"):
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(token)
    return commands


def _tokens(line: str) -> list[str]:
    """A shell line's words and operators (a comment with an unbalanced quote, such as `# CUDA's`, dropped first)."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        return list(lexer)
    except ValueError:
        return _tokens(line.split(" #", 1)[0]) if " #" in line else []


def documented_commands() -> list[tuple[str, list[str]]]:
    """(document name, words) of every command of a project program shown in the documents."""
    out = []
    for document in DOCUMENTS:
        for words in shell_commands(document.read_text()):
            while words and ENVIRONMENT.match(words[0]):
                words = words[1:]
            if words and words[0] in PROGRAMS:
                out.append((document.relative_to(REPO_ROOT).as_posix(), words))
    return out


def program_of(words: list[str]) -> tuple[str, str, list[str]]:
    """(kind, target, flags) of a command: kind 'script', 'module', 'make' or 'bash'."""
    flags = [w.split("=", 1)[0] for w in words if w.startswith("--")]
    if words[0] == "make":
        return "make", words[1], []
    if words[0] == "bash":
        return "bash", words[1], []
    rest = words[1:]
    if words[0] == "deepspeed":  # launcher options come before the script
        script = next(w for w in rest if w.endswith(".py"))
        return "script", script, [f for f in flags[flags.index("--deepspeed"):]] if "--deepspeed" in flags else []
    if rest[:1] == ["-m"]:
        return "module", rest[1], flags
    if rest[:1] == ["-c"]:
        return "inline", "", []
    return "script", rest[0], flags


_HELP: dict[tuple[str, str], str] = {}


def help_text(kind: str, target: str) -> str:
    """The `--help` output of a script or module, run in this process (imports are shared between programs)."""
    if (kind, target) not in _HELP:
        saved = sys.argv
        sys.argv = [target, "--help"]
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit):
                if kind == "module":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(REPO_ROOT / target), run_name="__main__")
        finally:
            sys.argv = saved
        _HELP[(kind, target)] = stdout.getvalue()
    return _HELP[(kind, target)]


COMMANDS = documented_commands()


def test_the_documents_show_commands_to_check():
    documents = {name for name, _ in COMMANDS}
    assert {"README.md", "docs/training.md", "docs/evaluation.md"} <= documents
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("document,words", COMMANDS, ids=[f"{n}:{' '.join(w)[:60]}" for n, w in COMMANDS])
def test_documented_command_names_a_real_program_and_its_real_flags(document, words):
    kind, target, flags = program_of(words)
    if kind == "inline":
        return
    if kind == "make":
        targets = re.findall(r"^([a-z][a-z-]*):", (REPO_ROOT / "Makefile").read_text(), re.M)
        assert target in targets, f"{document}: make {target} is not a Makefile target"
        return
    if kind == "bash":
        assert (REPO_ROOT / target).is_file(), f"{document}: {target} does not exist"
        return
    if kind == "script":
        assert (REPO_ROOT / target).is_file(), f"{document}: {target} does not exist"
    text = help_text(kind, target)
    documented = set(re.findall(r"--[A-Za-z0-9][A-Za-z0-9_-]*", text))
    unknown = [flag for flag in flags if flag not in documented]
    assert not unknown, f"{document}: `{' '.join(words)}` uses {unknown}, which `{target} --help` does not list"


def test_local_links_of_the_documents_point_to_files():
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)\)", document.read_text()):
            if "://" in target:
                continue
            assert (document.parent / target).exists(), f"{document.name} links to {target}, which does not exist"
