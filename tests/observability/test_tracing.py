"""Tracing through the OpenTelemetry SDK: spans, parent links across nested calls, errors, config."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import kservice
import pytest
from kservice.middleware import tracing
from kservice.middleware.tracing import ClientTracing, ServerTracing
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from tests.observability.conftest import client_chain, server_chain
from tests.observability.services import Echo, Nested

NO_HEALTH = {"health": {"enabled": False}}


_exporter = InMemorySpanExporter()


def _withdraw_provider() -> None:
    """Leave the process with no tracer provider, as before the test that set one.

    Otherwise every later test of this worker (other modules' too) would build
    its chains in auto mode with tracing in them: ``traceparent`` in their
    calls' metadata, maps sent call by call. OpenTelemetry sets a provider once
    per process; its own test utilities withdraw it the same way. The cached
    tracer goes too, so ``tracing`` looks for a provider afresh.
    """
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    tracing._tracer.tracer = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another test set a different tracer provider"
    assert tracing.refresh()
    _exporter.clear()
    try:
        yield _exporter
    finally:
        _exporter.clear()
        _withdraw_provider()


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
def test_tracing_is_outermost_then_metrics_then_call_log(spans: InMemorySpanExporter) -> None:
    # spans: a tracer provider is set, so auto mode puts tracing in the chains.
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
