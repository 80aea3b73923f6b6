"""The README's code blocks, extracted so tests can run them exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def serve_command() -> list[str]:
    """The README's one ``kservice serve`` command line, split into words."""
    (line,) = re.findall(r"```bash\n(kservice serve [^\n]*)\n```", README.read_text())
    return line.split()


def block_containing(marker: str) -> str:
    """The one python block containing ``marker``."""
    matches = [block for block in python_blocks() if marker in block]
    assert len(matches) == 1, f"expected one README python block containing {marker!r}, found {len(matches)}"
    return matches[0]


def write_kvstore(directory: Path) -> None:
    (directory / "kvstore.py").write_text(block_containing("# kvstore.py"))
