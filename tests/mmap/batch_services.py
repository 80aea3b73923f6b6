"""A service and middleware for the batch-hook tests of ``ServiceManager.map`` (importable by host processes)."""

from __future__ import annotations

import threading
from typing import Any

import kservice


class Items:
    """Counts every call that ran; ``check`` fails the items that are multiples of ``bad``."""

    def __init__(self) -> None:
        self.ran = 0
        self._failed: set[int] = set()
        self._lock = threading.Lock()

    def check(self, x: int, bad: int = 0) -> int:
        with self._lock:
            self.ran += 1
        if bad and x % bad == 0:
            raise ValueError(f"item {x} is bad")
        return x

    @kservice.idempotent
    def once_failing(self, x: int, every: int) -> int:
        """Fails the first run of each multiple of ``every`` (safe to re-send: declared idempotent)."""
        with self._lock:
            self.ran += 1
            first = x not in self._failed
            if x % every == 0 and first:
                self._failed.add(x)
                raise ValueError(f"item {x} fails once")
        return x

    def count(self) -> int:
        return self.ran

    def server_metrics(self, service: str) -> dict[str, Any]:
        """The server side's metrics of ``service`` as recorded in this (the host's) process."""
        from kservice.middleware import metrics

        return metrics.snapshot()["server"].get(service, {})


class RaisingHandleBatch(kservice.ServiceMiddleware):
    """Server middleware whose hooks raise for ``check`` calls, the batch hook as the per-call one."""

    def after_handle(self, response: kservice.ServiceResponse, request: kservice.ServiceRequest) -> None:
        if request.method_name == "check":
            raise RuntimeError("after_handle failed")

    def after_handle_batch(self, batch: kservice.CallBatch) -> None:
        if batch.method_name == "check":
            raise RuntimeError("after_handle failed")


def count_chunk_records(monkeypatch: Any) -> list[int]:
    """The sizes of the compact chunk records this process sends from now on (the compact path's trace);
    ``monkeypatch`` (pytest's) restores the encoder after the test."""
    from kservice.plugins.mmap import codec

    sent: list[int] = []
    encode_chunk = codec.encode_chunk

    def counting(chunk_id: str, service: str, method: str, args: Any, *rest: Any) -> bytes | None:
        sent.append(len(args))
        return encode_chunk(chunk_id, service, method, args, *rest)

    monkeypatch.setattr(codec, "encode_chunk", counting)
    return sent
