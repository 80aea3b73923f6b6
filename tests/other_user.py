"""A second Unix user, created for one test and removed afterwards: the other local user of the attacks we defend against."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class OtherUser:
    name: str
    uid: int
    gid: int

    def run(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user (``runuser``), checked, output captured."""
        return subprocess.run(
            ["runuser", "-u", self.name, "--", *argv],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,  # type: ignore[arg-type]
        )


def _cannot_create_users() -> str | None:
    if os.geteuid() != 0:
        return "creating a second Unix user needs root"
    for tool in ("useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@contextlib.contextmanager
def other_user() -> Iterator[OtherUser]:
    """A new Unix user with a home directory of its own; removed (home included) when the block ends.

    Skips the test, saying why, where users cannot be created (not root, no useradd).
    """
    reason = _cannot_create_users()
    if reason:
        pytest.skip(reason)
    name = f"ks{uuid.uuid4().hex[:10]}"
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True, timeout=60
    )
    try:
        entry = pwd.getpwnam(name)
        yield OtherUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)
