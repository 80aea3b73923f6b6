"""Steps of the wall clock for tests (see ``sitecustomize``): :func:`clock_file`, :func:`step`, :func:`environ`."""

from __future__ import annotations

import os
import struct
from pathlib import Path

#: the directory to put on a child's PYTHONPATH so that its wall clock follows a clock file
HOOK_DIRECTORY = Path(__file__).resolve().parent


def clock_file(path: Path, offset: float = 0.0) -> Path:
    """Create the 8-byte file holding a wall-clock offset in seconds."""
    path.write_bytes(struct.pack("d", offset))
    return path


def step(path: Path, offset: float) -> None:
    """Set the offset every process reading ``path`` adds to its wall clock (one aligned 8-byte write)."""
    with open(path, "r+b") as file:
        os.pwrite(file.fileno(), struct.pack("d", offset), 0)


def environ(base: dict[str, str], path: Path, *more_paths: str) -> dict[str, str]:
    """``base`` for a child whose wall clock (and its children's) follows ``path``."""
    pythonpath = [str(HOOK_DIRECTORY), *more_paths, base.get("PYTHONPATH", "")]
    return {**base, "KSERVICE_TEST_CLOCK_FILE": str(path), "PYTHONPATH": os.pathsep.join(filter(None, pythonpath))}
