"""Services the CLI tests host with `kservice serve` (imported by the serving subprocess)."""

from __future__ import annotations

import time
from typing import Any


class KV:
    """A small key-value store."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self._data[key] = value

    def get(self, key: str) -> Any:
        return self._data.get(key)

    def slow(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def boom(self) -> None:
        raise ValueError("the boom method always fails")


class OutOfStock(Exception):
    """A service's own exception class."""


class Inventory:
    """Stock that runs out."""

    def __init__(self) -> None:
        self.stock = {"apple": 3}

    def take(self, item: str, count: int) -> int:
        left = self.stock.get(item, 0)
        if count > left:
            raise OutOfStock(f"only {left} {item} left")
        self.stock[item] = left - count
        return left - count
