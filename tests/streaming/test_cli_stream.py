"""``kservice call --stream``: items printed as they arrive, JSON lines with --json."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.cli.helpers import KSERVICE, assert_user_error, cli_env, run_cli
from tests.mmap.services import hosting, unique

pytestmark = pytest.mark.timeout(90)


def test_call_stream_prints_items_as_they_arrive() -> None:
    name = unique("model")
    with hosting(f"{name}=tests.streaming.services:TokenModel"):
        process = subprocess.Popen(
            [KSERVICE, "call", "--stream", name, "tokens", '["once upon a time", 0.4]'],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        assert process.stdout is not None
        first = process.stdout.readline()
        first_at = time.monotonic()
        rest, err = process.communicate(timeout=30)
        ended_at = time.monotonic()
        assert process.returncode == 0, err
        assert [first.strip(), *rest.split()] == ["once", "upon", "a", "time"]
        assert ended_at - first_at > 0.8  # the first word was printed before the last one was made
        as_json = run_cli("call", "--stream", "--json", name, "blobs", "[2, 3]")
        assert as_json.returncode == 0, as_json
        assert [json.loads(line) for line in as_json.stdout.splitlines()] == [
            "b'\\x00\\x00\\x00'",
            "b'\\x01\\x01\\x01'",
        ]
        counted = run_cli("call", "--stream", "--json", name, "count", "[3]")
        assert counted.stdout.splitlines() == ["0", "1", "2"]
        broken = run_cli("call", "--stream", name, "broken", "[2]")
        assert broken.stdout.splitlines() == ["0", "1"]
        assert_user_error(broken, "broke after 2", status=1)
        plain = run_cli("call", name, "count", "[2]")
        assert_user_error(plain, f"kservice call --stream {name} count", status=1)
        not_streaming = run_cli("call", "--stream", name, "pid", "[]")
        assert_user_error(not_streaming, "kservice call without --stream", status=1)
        misuse = run_cli("call", "--stream", name, "count", "[2]", "--async", "3")
        assert misuse.returncode == 2 and "--stream and --async" in misuse.stderr
