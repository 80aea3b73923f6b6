"""The mmap transport, black box: a service in a child process (``kind="process"``) called over shared memory."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kservice import (
    MethodNotFoundError,
    ServiceCallError,
    ServiceEnvironment,
    ServiceFactory,
    ServiceManager,
    ServiceOverloadedError,
    ServiceStatus,
    ServiceUnavailableError,
)
from kservice.plugins.mmap import codec
from kservice.plugins.mmap.ring import LAYOUT_VERSION, QueueFull, attach_queue, create_queue, queue_directory
from kservice.testing import wait_for

from .services import KV, Broken, PickleBomb, PickleBombs, Serial, unique

pytestmark = pytest.mark.timeout(60)

#: Overload must reach the caller, not be retried away by a retry plugin.
NO_RETRIES = {"service_call": {"max_retries": 0}}


def accepted(manager: ServiceManager, name: str) -> int:
    """How many calls the host of ``name`` has accepted and not finished (running or queued)."""
    status = manager.get_service_status(name)
    if isinstance(status, dict):
        return int(status["in_flight"]) + int(status["queue_depth"])
    return status.in_flight + status.queue_depth


@pytest.fixture
def kv_env() -> Iterator[tuple[ServiceEnvironment, ServiceManager]]:
    env = ServiceEnvironment("mmap-tests")
    env.register_service("kv", ServiceFactory("kv", KV), kind="process")
    with env:
        yield env, env.manager()


def test_round_trip_runs_in_the_child_process(kv_env: tuple[ServiceEnvironment, ServiceManager]) -> None:
    env, manager = kv_env
    manager.call_service_sync("kv", "put", ("a", [1, 2, 3]))
    assert manager.call_service_sync("kv", "get", ("a",)) == [1, 2, 3]
    child = manager.call_service_sync("kv", "pid")
    assert child != os.getpid()
    assert child == env.get_task("kv").pid  # type: ignore[union-attr]
    assert manager.get_service_queue("kv").queue_name.startswith("svc.kv.")
    # kwargs named like call options reach the method
    assert manager.call_service_sync("kv", "add", (), {"a": 2, "b": 3}) == 5


def test_async_calls_are_completed_by_the_dispatcher(kv_env: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = kv_env
    futures = [manager.call_service_async("kv", "add", (i, 1)) for i in range(500)]
    assert [f.result(10) for f in futures] == [i + 1 for i in range(500)]
    assert "kservice-mmap-responses" in {t.name for t in threading.enumerate()}


def test_remote_errors_keep_their_types(kv_env: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = kv_env
    with pytest.raises(KeyError) as info:
        manager.call_service_sync("kv", "get", ("missing",))
    assert isinstance(info.value, ServiceCallError)
    assert "missing" in str(info.value)
    assert "Traceback" in info.value.remote_traceback
    with pytest.raises(MethodNotFoundError, match="did you mean 'get'"):
        manager.call_service_sync("kv", "gett", ("a",))
    with pytest.raises(MethodNotFoundError, match="private"):
        manager.call_service_sync("kv", "__init__")
    with pytest.raises(TypeError):
        manager.call_service_sync("kv", "add", (1, 2, 3))
    with pytest.raises(ValueError, match="boom"):
        manager.call_service_sync("kv", "fail", ("boom",))
    # and the service keeps serving
    assert manager.call_service_sync("kv", "add", (1, 2)) == 3


def test_unpicklable_argument_is_a_clear_error_and_nothing_is_sent(
    kv_env: tuple[ServiceEnvironment, ServiceManager],
) -> None:
    _, manager = kv_env
    before = manager.get_service_status("kv").requests_total  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=r"not picklable.*nothing was sent"):
        manager.call_service_sync("kv", "echo", (threading.Lock(),))
    with pytest.raises(TypeError, match="not picklable"):
        manager.call_service_async("kv", "echo", (lambda: 1,)).result(10)
    after = manager.get_service_status("kv").requests_total  # type: ignore[union-attr]
    assert after == before
    assert manager.call_service_sync("kv", "echo", ("fine",)) == "fine"


def test_unpicklable_result_is_a_service_call_error(kv_env: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = kv_env
    with pytest.raises(ServiceCallError, match=r"cannot be sent back.*not picklable"):
        manager.call_service_sync("kv", "unpicklable")
    assert manager.call_service_sync("kv", "echo", (1,)) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_a_value_whose_pickling_raises_system_exit_is_unpicklable_like_any_other(kind: str) -> None:
    """Before: the SystemExit or KeyboardInterrupt passed the pickling guards and ended the thread encoding
    it: the host's answer was never sent (the call waited out its timeout) and later async calls to the
    host timed out too."""
    name = unique("bombs")
    config = {"service_call": {"max_retries": 0}, "breaker": {"enabled": False}}
    environment = ServiceEnvironment("pickle-bombs", config)
    environment.register_service(name, ServiceFactory(name, PickleBombs), kind="process")
    with environment, ServiceManager(environment) as manager:
        started = time.monotonic()
        for _ in range(2):
            with pytest.raises(ServiceCallError, match=r"cannot be sent back.*not picklable"):
                manager.call_service_sync(name, "bomb", (kind,), timeout=10)
            with pytest.raises(ServiceCallError, match=r"cannot be sent back.*not picklable"):
                manager.call_service_async(name, "bomb", (kind,), timeout=10).result(15)
            answers = list(manager.map(name, "bomb", [(kind,)] * 3, timeout=10, return_exceptions=True))
            assert all(isinstance(answer, TypeError) and "not picklable" in str(answer) for answer in answers), answers
            stream = manager.stream(name, "stream_bomb", (kind,), timeout=10)
            assert next(stream) == "before"
            with pytest.raises(TypeError, match="not picklable"):
                next(stream)
            for send in (manager.call_service_sync, lambda *a, **k: manager.call_service_async(*a, **k).result(15)):
                with pytest.raises(TypeError, match=r"not picklable.*nothing was sent"):
                    send(name, "echo", (PickleBomb(kind),), timeout=10)
        assert time.monotonic() - started < 8.0, "a call waited for its timeout"
        assert manager.call_service_async(name, "echo", ("still",), timeout=10).result(15) == "still"


@pytest.mark.timeout(60)
def test_with_the_default_configuration_a_result_whose_pickling_raises_system_exit_runs_once_and_ends_at_once() -> None:
    """Retries on (the default): the result that cannot leave is the call's TypeError, never re-sent, well
    before its deadline. Before: the host's thread ended, and the call waited out its deadline."""
    name = unique("bombs")
    with ServiceEnvironment("pickle-bombs-default") as environment:
        environment.register_service(name, ServiceFactory(name, PickleBombs), kind="process")
        with ServiceManager(environment) as manager:
            for made in (1, 2):
                began = time.monotonic()
                with pytest.raises(ServiceCallError, match=r"cannot be sent back.*not picklable"):
                    manager.call_service_async(name, "bomb", ("exit",), timeout=10).result(15)
                assert time.monotonic() - began < 5.0, "the call waited for its deadline"
                assert manager.call_service_sync(name, "bombs_made", timeout=10) == made, "it ran more than once"


def test_every_record_size_up_to_beyond_the_ring_capacity(kv_env: tuple[ServiceEnvironment, ServiceManager]) -> None:
    _, manager = kv_env
    capacity = attach_queue(manager.get_service_queue("kv").queue_name).capacity
    sizes = [
        0,
        1,
        7,
        8,
        4089,
        65536,
        codec.OUT_OF_BAND_THRESHOLD - 1,
        codec.OUT_OF_BAND_THRESHOLD,
        capacity // 4 + 1,
        capacity - 8,
        capacity,
        capacity + 1,
        2 * capacity,
    ]
    for size in sizes:
        payload = os.urandom(size)
        assert manager.call_service_sync("kv", "size", (payload,)) == size
        assert manager.call_service_sync("kv", "echo", (payload,)) == payload
        assert manager.call_service_sync("kv", "echo", (bytearray(payload),)) == bytearray(payload)
        # a big pickle of many small objects travels whole in a segment
        nested = [payload[i : i + 100] for i in range(0, size, 100)]
        assert manager.call_service_sync("kv", "echo", (nested,)) == nested
    assert not [p for p in queue_directory().iterdir() if p.name.startswith("oob-")]


def test_numpy_arrays_travel_out_of_band_without_copies(kv_env: tuple[ServiceEnvironment, ServiceManager]) -> None:
    np = pytest.importorskip("numpy")
    _, manager = kv_env
    array = np.arange(1 << 20, dtype=np.float64)  # 8 MiB
    back = manager.call_service_sync("kv", "echo", (array,))
    assert (back == array).all()
    back[0] = 42.0  # writable (copy-on-write mapping), the file is gone
    assert not [p for p in queue_directory().iterdir() if p.name.startswith("oob-")]


def test_status_comes_from_the_child(kv_env: tuple[ServiceEnvironment, ServiceManager]) -> None:
    env, manager = kv_env
    manager.call_service_sync("kv", "echo", (1,))
    status = manager.get_service_status("kv")
    assert isinstance(status, ServiceStatus)
    assert status.kind == "process" and status.state == "running"
    assert status.extra["pid"] == env.get_task("kv").pid  # type: ignore[union-attr]
    assert status.requests_total >= 1
    # The connection reports it too, for managers outside the environment.
    remote = manager.get_service_queue("kv").remote_status()  # type: ignore[attr-defined]
    assert remote["pid"] == status.extra["pid"]


def test_failed_child_start_reports_its_stderr() -> None:
    env = ServiceEnvironment("broken")
    env.register_service("broken", ServiceFactory("broken", Broken), kind="process")
    with pytest.raises(ServiceUnavailableError, match="constructor exploded on purpose"):
        env.start()
    env.stop()


def test_not_thread_safe_service_runs_one_request_at_a_time() -> None:
    env = ServiceEnvironment("serial")
    env.register_service("serial", ServiceFactory("serial", Serial), kind="process")
    with env:
        manager = env.manager()
        for _ in range(5):  # teach the listener that work() is fast, so some calls run inline
            manager.call_service_sync("serial", "work", (0.0,))
        futures = [manager.call_service_async("serial", "work", (0.002 if i % 3 else 0.0,)) for i in range(60)]
        assert max(f.result(20) for f in futures) == 1


def test_full_queue_is_overloaded_after_queue_timeout() -> None:
    env = ServiceEnvironment("full", NO_RETRIES)
    env.register_service(
        "blocked",
        ServiceFactory("blocked", Serial),
        kind="process",
        local={"request_queue_size": 1, "queue_timeout": 0.3},
    )
    with env:
        manager = env.manager()
        running = [manager.call_service_async("blocked", "block", (1.5,)) for _ in range(2)]
        wait_for(lambda: accepted(manager, "blocked") >= 2, what="one call to run and one to fill the task's queue")
        started = time.monotonic()
        with pytest.raises(ServiceOverloadedError):
            manager.call_service_sync("blocked", "block", (0.0,), timeout=5)
        waited = time.monotonic() - started
        assert 0.25 < waited < 3.0  # generous: shared, loaded machines
        assert [f.result(10) for f in running] == [1.5, 1.5]
        assert manager.call_service_sync("blocked", "block", (0.0,)) == 0.0


def test_full_request_ring_is_overloaded_after_queue_timeout() -> None:
    name = unique("ring")
    env = ServiceEnvironment("ring-full", NO_RETRIES)
    env.register_service(
        name,
        ServiceFactory(name, KV),
        kind="process",
        local={"queue_timeout": 0.3},
        mmap={"request_queue_capacity": 4096},
    )
    with env:
        manager = env.manager()
        queue = manager.get_service_queue(name).queue_name
        # Fill the service's ring with records it does not read yet: a paused child.
        child = env.get_task(name).pid  # type: ignore[union-attr]
        ring = attach_queue(queue)
        filler = codec.encode_status_request("filler", name, "nowhere", time.time() + 60)
        try:
            for _ in range(50):
                os.kill(child, 19)  # SIGSTOP
                wait_for(
                    lambda: psutil.Process(child).status() == psutil.STATUS_STOPPED,
                    what="the child to stop",
                    interval=0.001,
                )
                filled = 0
                while True:
                    try:
                        ring.put_nowait(filler)
                        filled += 1
                    except QueueFull:
                        break
                if filled and ring.qsize() >= filled:
                    break  # stopped while not holding the ring's lock: the ring is really full
                os.kill(child, 18)  # stopped inside a lock section: let it go on and try again
                time.sleep(0.01)  # deliberate: let it leave the lock section before stopping it again
            started = time.monotonic()
            with pytest.raises(ServiceOverloadedError, match=r"queue_timeout=0.3"):
                manager.call_service_sync(name, "echo", (1,), timeout=5)
            assert 0.25 < time.monotonic() - started < 3.0  # generous: shared, loaded machines
        finally:
            ring.close()
            os.kill(child, 18)  # SIGCONT
        assert manager.call_service_sync(name, "echo", (2,)) == 2


@pytest.fixture(scope="module")
def garbage_target() -> Iterator[tuple[ServiceEnvironment, ServiceManager, str]]:
    env = ServiceEnvironment("garbage")
    name = unique("garbage")
    env.register_service(name, ServiceFactory(name, KV), transports=["mmap"])
    env.start()
    try:
        yield env, env.manager(), name
    finally:
        env.stop()


@pytest.mark.allow_leaks  # the module-scoped service outlives each example
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=300) | st.just(b"O" + b"\x00" * 40) | st.just(pickle.dumps(("not", "a", "request"))))
def test_garbage_records_are_reported_and_skipped(
    garbage_target: tuple[ServiceEnvironment, ServiceManager, str], garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    env, _, name = garbage_target
    queue = next(a.target for a in env.get_task(name).addresses if a.transport == "mmap")  # type: ignore[union-attr]
    ring = attach_queue(queue)
    with caplog.at_level(logging.WARNING, logger="kservice.mmap"):
        ring.put(garbage)
        with ServiceManager() as outsider:  # over mmap, found through the registry
            assert outsider.call_service_sync(name, "echo", (garbage,), timeout=5) == garbage
    ring.close()
    assert any("skipped" in r.getMessage() for r in caplog.records)


def test_wrong_layout_version_is_a_clear_error() -> None:
    name = unique("old")
    ring = create_queue(f"svc.{name}", 4096)
    try:
        with open(ring.path, "r+b") as f:
            f.seek(8)
            f.write((LAYOUT_VERSION + 1).to_bytes(4, "little"))
        from kservice import ServiceAddress
        from kservice.plugins.mmap import MmapTransport

        with pytest.raises(ServiceUnavailableError, match=r"incompatible kservice version.*layout version"):
            MmapTransport().connect(ServiceAddress("mmap", name, ring.name))
    finally:
        ring.close()
        ring.unlink()


def test_in_process_listener_serves_other_processes_and_refuses_private_names() -> None:
    name = unique("local")
    env = ServiceEnvironment("local", {"services": {name: {"class": "tests.mmap.services:KV", "transports": ["mmap"]}}})
    with env:
        with ServiceManager() as outsider:  # no environment: found through the registry
            assert outsider.call_service_sync(name, "add", (1, 1)) == 2
            with pytest.raises(MethodNotFoundError, match="private"):
                outsider.call_service_sync(name, "_data")


def test_disabling_the_plugin_leaves_the_rest_working() -> None:
    import subprocess
    import sys

    from .services import child_env

    code = (
        "from kservice import ServiceEnvironment, ServiceFactory, ConfigError\n"
        "from tests.mmap.services import KV\n"
        "env = ServiceEnvironment('x')\n"
        "env.register_service('kv', KV)\n"
        "with env:\n"
        "    print(env.manager().call_service_sync('kv', 'add', (1, 2)))\n"
        "try:\n"
        "    env.register_service('p', ServiceFactory('p', KV), kind='process')\n"
        "except ConfigError as exc:\n"
        "    print('no process kind' if 'process' in str(exc) else exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**child_env(), "KSERVICE_DISABLE_PLUGINS": "mmap"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "no", "process", "kind"]


def test_a_fast_method_first_queued_behind_slow_work_still_runs_inline_afterwards() -> None:
    """The listener learns a method's cost from its run, not from its wait behind a busy pool."""
    name = unique("backlog")
    env = ServiceEnvironment(
        "backlog",
        {
            "services": {
                name: {
                    "class": "tests.mmap.services:KV",
                    "transports": ["mmap"],
                    "local": {"max_workers": 2},
                    # A limit far above a run of the method on a loaded machine, far below its wait (~0.3 s).
                    "mmap": {"inline_limit": 0.05},
                }
            }
        },
    )
    with env, ServiceManager() as outsider:  # through the registry: the mmap listener, not in-process
        busy = [outsider.call_service_async(name, "sleep", (0.5,)) for _ in range(2)]  # every worker busy
        wait_for(lambda: accepted(outsider, name) >= 2, what="both workers to be busy")
        # Its first call runs in the pool, after waiting ~0.3 s behind the sleeps.
        assert outsider.call_service_sync(name, "thread_name").startswith(f"kservice-{name}-")
        assert [f.result(10) for f in busy] == [0.5, 0.5]
        # That wait did not count as its cost: from now on it runs in the listener's own thread.
        assert outsider.call_service_sync(name, "thread_name") == f"kservice-mmap-{name}"


def test_an_async_call_that_times_out_is_forgotten_at_its_deadline(
    kv_env: tuple[ServiceEnvironment, ServiceManager],
) -> None:
    from kservice import ServiceTimeoutError
    from kservice.plugins.mmap.transport import _client

    _, manager = kv_env
    assert manager.call_service_sync("kv", "sleep", (0.0,)) == 0.0
    late = manager.call_service_async("kv", "sleep", (1.0,), timeout=0.2)
    request_id = late._request.request_id  # type: ignore[attr-defined]
    assert request_id in _client.pending
    with pytest.raises(ServiceTimeoutError):
        late.result(5)
    # The service is still sleeping; the call's entry is gone already, not when the late answer comes.
    wait_for(
        lambda: request_id not in _client.pending and request_id not in _client.senders,
        timeout=0.5,
        what="the timed-out call's entry to be dropped",
    )
    assert manager.call_service_sync("kv", "sleep", (0.0,), timeout=5) == 0.0  # the late answer is ignored


def test_response_rings_are_swept_when_idle_but_never_while_a_call_waits_on_them(
    kv_env: tuple[ServiceEnvironment, ServiceManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kservice.plugins.mmap import transport

    _, manager = kv_env
    assert manager.call_service_sync("kv", "echo", (1,)) == 1
    mine = transport._client._local.ring
    monkeypatch.setattr(transport, "IDLE_RING_SECONDS", 0.0)  # every ring not in use is idle enough

    waited: list[float] = []
    waiting = threading.Thread(target=lambda: waited.append(manager.call_service_sync("kv", "sleep", (0.5,))))
    waiting.start()
    wait_for(lambda: accepted(manager, "kv") >= 1, what="its call to be in flight, its ring busy")

    def first_call() -> None:  # a thread's first call makes its ring, and sweeps the idle ones
        assert manager.call_service_sync("kv", "echo", (2,)) == 2

    sweepers = [threading.Thread(target=first_call) for _ in range(4)]
    for thread in sweepers:
        thread.start()
    for thread in [*sweepers, waiting]:
        thread.join(10)
    assert waited == [0.5]  # the busy ring was left alone: its call got its answer
    assert mine.closed and not (queue_directory() / f"{mine.queue.name}.q").exists()  # the idle one was removed
    assert manager.call_service_sync("kv", "echo", (3,)) == 3  # and this thread simply gets a new one
    assert transport._client._local.ring is not mine
