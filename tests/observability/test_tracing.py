"""Tracing through the OpenTelemetry SDK: spans, parent links across nested calls, errors, config."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import kservice
import pytest
from kservice.middleware import tracing
from kservice.middleware.tracing import ClientTracing, ServerTracing
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.observability.conftest import client_chain, server_chain
from tests.observability.services import Echo, Nested

NO_HEALTH = {"health": {"enabled": False}}


class _Switch(SpanProcessor):
    """Forwards spans only while a tracing test runs (the global provider can be set only once per process)."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner
        self.active = False

    def on_start(self, span, parent_context=None):  # type: ignore[no-untyped-def]
        if self.active:
            self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            self.inner.on_end(span)


_exporter = InMemorySpanExporter()
_switch = _Switch(SimpleSpanProcessor(_exporter))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(_switch)
        trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another test set a different tracer provider"
    assert tracing.refresh()
    _exporter.clear()
    _switch.active = True
    yield _exporter
    _switch.active = False
    _exporter.clear()


def by_name_and_kind(finished: Sequence[ReadableSpan]) -> dict[tuple[str, SpanKind], ReadableSpan]:
    return {(span.name, span.kind): span for span in finished}


@pytest.mark.timeout(30)
def test_nested_call_spans_share_one_trace_with_parent_links(spans: InMemorySpanExporter) -> None:
    with kservice.ServiceEnvironment("t", NO_HEALTH) as env:
        inner_manager = env.manager()
        env.register_service("b", Echo)
        env.register_service("a", Nested, inner_manager, "b")
        manager = env.manager()
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("test-root") as root:
            assert manager.call_service_sync("a", "relay", ("x",)) == "x"
    got = by_name_and_kind(spans.get_finished_spans())
    a_client = got[("a/relay", SpanKind.CLIENT)]
    a_server = got[("a/relay", SpanKind.SERVER)]
    b_client = got[("b/echo", SpanKind.CLIENT)]
    b_server = got[("b/echo", SpanKind.SERVER)]
    trace_id = root.get_span_context().trace_id
    assert {s.context.trace_id for s in (a_client, a_server, b_client, b_server)} == {trace_id}
    assert a_client.parent is not None and a_client.parent.span_id == root.get_span_context().span_id
    assert a_server.parent is not None and a_server.parent.span_id == a_client.context.span_id
    assert a_server.parent.is_remote, "the server span's parent came through request.metadata"
    assert b_client.parent is not None and b_client.parent.span_id == a_server.context.span_id
    assert b_server.parent is not None and b_server.parent.span_id == b_client.context.span_id
    assert a_server.attributes["rpc.system"] == "kservice"
    assert a_server.attributes["rpc.method"] == "relay" and a_server.attributes["rpc.service"] == "a"


@pytest.mark.timeout(30)
def test_async_call_and_failed_call_spans(spans: InMemorySpanExporter) -> None:
    with kservice.ServiceEnvironment("t", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        manager = env.manager()
        assert manager.call_service_async("echo", "echo", (1,)).result(5) == 1
        with pytest.raises(ValueError):
            manager.call_service_sync("echo", "fail", ("bad input",))
    finished = spans.get_finished_spans()
    got = by_name_and_kind(finished)
    client, server = got[("echo/echo", SpanKind.CLIENT)], got[("echo/echo", SpanKind.SERVER)]
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        failed = got[("echo/fail", kind)]
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.status.description == "bad input"
        assert failed.attributes["error.type"] == "ValueError"
    # Separate calls are separate traces.
    assert client.context.trace_id != got[("echo/fail", SpanKind.CLIENT)].context.trace_id


@pytest.mark.timeout(30)
def test_caller_metadata_dict_is_not_modified(spans: InMemorySpanExporter) -> None:
    metadata = {"tenant": "t1"}
    with kservice.ServiceEnvironment("t", NO_HEALTH) as env:
        env.register_service("echo", Echo)
        env.manager().call_service_sync("echo", "echo", (1,), metadata=metadata)
    assert metadata == {"tenant": "t1"}
    assert len(spans.get_finished_spans()) == 2


@pytest.mark.timeout(30)
def test_tracing_disabled_by_config_is_not_in_the_chain(spans: InMemorySpanExporter) -> None:
    config = {
        **NO_HEALTH,
        "services": {"quiet": {"class": "tests.observability.services:Echo", "tracing": {"enabled": False}}},
    }
    with kservice.ServiceEnvironment("t", config) as env:
        env.register_service("loud", Echo)
        manager = env.manager()
        manager.call_service_sync("quiet", "echo", (1,))
        manager.call_service_sync("loud", "echo", (1,))
        quiet = env.get_task("quiet")
        assert quiet is not None
        assert not any(isinstance(m, (ClientTracing, ServerTracing)) for m in client_chain(manager, "quiet"))
        assert not any(isinstance(m, (ClientTracing, ServerTracing)) for m in server_chain(quiet))
    assert {span.name for span in spans.get_finished_spans()} == {"loud/echo"}


@pytest.mark.timeout(30)
def test_tracing_is_outermost_then_metrics_then_call_log() -> None:
    config = {**NO_HEALTH, "call_log": {"enabled": True, "side": "both"}}
    with kservice.ServiceEnvironment("t", config) as env:
        task = env.register_service("echo", Echo)
        manager = env.manager()
        manager.call_service_sync("echo", "echo", (1,))
        for chain in (client_chain(manager, "echo"), server_chain(task)):
            names = [type(m).__name__ for m in chain]
            ours = [
                n
                for n in names
                if n in ("ClientTracing", "ServerTracing", "ClientMetrics", "ServerMetrics", "CallLogMiddleware")
            ]
            assert ours == [
                "ClientTracing",
                "ServerTracing",
                "ClientMetrics",
                "ServerMetrics",
                "CallLogMiddleware",
                "CallLogMiddleware",
            ]
