"""Tracing covers a whole stream, and a stream's server span never leaks into the thread that opened it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import kservice
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.observability.test_tracing import NO_HEALTH, by_name_and_kind, spans  # noqa: F401 - the fixture


class Spanned:
    def words(self, n: int, delay: float) -> Iterator[int]:
        for _ in range(n):
            time.sleep(delay)
            yield trace.get_current_span().get_span_context().span_id

    def broken(self) -> Iterator[int]:
        yield 1
        raise ValueError("mid-stream")


@pytest.mark.timeout(30)
def test_stream_spans_cover_the_whole_stream(spans: InMemorySpanExporter) -> None:  # noqa: F811
    with kservice.ServiceEnvironment("traced-streams", NO_HEALTH) as env:
        env.register_service("spanned", Spanned)
        manager = env.manager()
        for _ in range(3):  # later streams start in the caller's thread (their first item is quick)
            seen = list(manager.stream("spanned", "words", (4, 0.0)))
            assert not trace.get_current_span().get_span_context().is_valid, "a server span leaked into the caller"
        spans.clear()
        began = time.perf_counter()
        seen = list(manager.stream("spanned", "words", (5, 0.02)))
        took = time.perf_counter() - began
        with pytest.raises(ValueError):
            list(manager.stream("spanned", "broken"))
        assert not trace.get_current_span().get_span_context().is_valid
    got = by_name_and_kind(spans.get_finished_spans())
    client, server = got[("spanned/words", SpanKind.CLIENT)], got[("spanned/words", SpanKind.SERVER)]
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert set(seen) == {server.context.span_id}  # the server span is current while the generator runs
    assert (server.end_time - server.start_time) / 1e9 >= 0.09  # the whole stream, not its first item
    assert (client.end_time - client.start_time) / 1e9 >= 0.09 and (
        client.end_time - client.start_time
    ) / 1e9 <= took + 0.05
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        assert got[("spanned/broken", kind)].status.status_code is StatusCode.ERROR
