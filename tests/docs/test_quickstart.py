"""docs/quickstart.md works as written: its files are written, its commands run, their outputs checked.

Conventions of the page: a ```python block whose first line is ``# NAME.py``
is a file to save; in a ```console block, ``$ COMMAND`` lines are run in
order (``kservice serve`` in the background, as "one terminal") and the lines
after a command are its expected output, where ``...`` matches anything
within a line and a line of just ``...`` matches any number of lines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli.helpers import KSERVICE, cli_env

DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"


@dataclass
class Command:
    argv: str
    expected: list[str] = field(default_factory=list)


def parse(markdown: str) -> tuple[dict[str, str], list[Command]]:
    """The files and the console commands of a page, in page order."""
    files: dict[str, str] = {}
    commands: list[Command] = []
    for language, body in re.findall(r"```(\w+)\n(.*?)```", markdown, re.S):
        if language == "python":
            first = body.splitlines()[0]
            assert re.fullmatch(r"# [\w.]+\.py", first), f"python block without a '# NAME.py' first line: {first!r}"
            files[first[2:]] = body
        elif language == "console":
            for line in body.splitlines():
                if line.startswith("$ "):
                    commands.append(Command(line[2:]))
                else:
                    commands[-1].expected.append(line)
    return files, commands


def matches(expected: list[str], actual: str) -> bool:
    pattern = ""
    for line in expected:
        if line == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += ".*".join(re.escape(part) for part in line.split("...")) + r"\n"
    return re.fullmatch(pattern, actual if actual.endswith("\n") or not actual else actual + "\n", re.S) is not None


def argv_of(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    if words[0] == "pytest":
        return [sys.executable, "-m", "pytest", *words[1:]]
    assert words[0] == "kservice", command
    return [KSERVICE, *words[1:]]


@pytest.fixture
def private_registry() -> Iterator[dict[str, str]]:
    """Queue and registry directories of this test only, so 'kv' is ours alone; removed afterwards."""
    queues = Path(f"/dev/shm/kservice-{os.getuid()}-quickstart-{uuid.uuid4().hex[:8]}")
    env = cli_env(KSERVICE_QUEUE_DIR=str(queues), KSERVICE_REGISTRY_DIR=f"{queues}-services")
    # The page's commands run in a user's directory, not in this repository's test tree.
    env.pop("PYTHONPATH", None)
    try:
        yield env
    finally:
        leftovers = sorted(p.name for p in queues.glob("*")) if queues.exists() else []
        shutil.rmtree(queues, ignore_errors=True)
        shutil.rmtree(f"{queues}-services", ignore_errors=True)
        assert leftovers == [], f"the quickstart left shared-memory files behind: {leftovers}"


@pytest.mark.timeout(120)
def test_the_quickstart_runs_as_written(tmp_path: Path, private_registry: dict[str, str]) -> None:
    files, commands = parse(DOC.read_text(encoding="utf-8"))
    assert set(files) == {"kv.py", "local.py", "client.py", "owner.py", "test_kv.py"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    host: subprocess.Popen[str] | None = None
    try:
        for command in commands:
            argv = argv_of(command.argv)
            if command.argv.startswith("kservice serve"):
                host = subprocess.Popen(
                    argv, cwd=tmp_path, env=private_registry, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                assert host.stdout is not None
                first = host.stdout.readline()
                assert matches(command.expected, first), (command, first, host.stderr.read() if not first else "")
                continue
            done = subprocess.run(argv, cwd=tmp_path, env=private_registry, capture_output=True, text=True, timeout=90)
            assert done.returncode == 0, (command.argv, done.stdout, done.stderr)
            assert matches(command.expected, done.stdout), (command.argv, command.expected, done.stdout)
    finally:
        if host is not None:
            host.send_signal(signal.SIGINT)  # Ctrl-C, as the page says
            try:
                host.wait(20)
            finally:
                if host.poll() is None:
                    host.kill()
                    host.wait()
                for stream in (host.stdout, host.stderr):
                    if stream is not None:
                        stream.close()
    assert host is not None and host.returncode == 0
