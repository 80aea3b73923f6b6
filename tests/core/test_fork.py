"""A manager used in a process forked after it was made (multiprocessing's fork workers, a pre-forking server)."""

from __future__ import annotations

import pytest

from tests.core.conftest import run_python

pytestmark = pytest.mark.timeout(60)

FORKED = """
import os, sys, time
import kservice
from kservice import ServiceFactory, ServiceTimeoutError
from tests.core.services import KeyValue

env = kservice.ServiceEnvironment("forked")
env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
env.start()
manager = kservice.ServiceManager(env)
assert manager.call_service_async("kv", "get", ("a",)).result(10) == 1  # the parent's timer thread runs
pid = os.fork()
if pid == 0:
    began = time.monotonic()
    future = manager.call_service_async("kv", "sleep", (5.0,), timeout=0.5)
    try:
        future.result(4)
        print("answered")
    except ServiceTimeoutError:
        print("deadline", round(time.monotonic() - began, 1))
    except TimeoutError:
        print("still pending after 4 s")
    print("sync", manager.call_service_sync("kv", "get", ("a",), timeout=10))
    print("async", manager.call_service_async("kv", "get", ("a",), timeout=10).result(10), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
env.stop()
from kservice.plugins.mmap import reclaim
reclaim()  # the child ended with os._exit, as a fork worker does: its response rings are left to reclaim
"""


def test_async_calls_in_a_forked_child_end_at_their_deadline() -> None:
    result = run_python(FORKED)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # Before: the child had the parent's timer object but not its thread, so no deadline ever fired.
    assert lines[0].startswith("deadline"), lines
    assert float(lines[0].split()[1]) < 3.0
    assert lines[1:] == ["sync 1", "async 1"]


INHERITED = """
import os, sys, time
import kservice
from kservice import ServiceFactory, ServiceStoppedError
from tests.core.services import KeyValue

env = kservice.ServiceEnvironment("inherited")
env.register_service("kv", ServiceFactory("kv", KeyValue, ({"a": 1},)), kind="process")
env.register_service("loc", ServiceFactory("loc", KeyValue, ({"a": 2},)), kind="local")
env.start()
manager = env.manager()
host = env.get_task("kv").pid
for _ in range(3):  # get is then known fast: a sync call would run inline
    assert manager.call_service_sync("loc", "get", ("a",)) == 2
pid = os.fork()
if pid == 0:
    for method, args in (("get", ("a",)), ("put", ("a", 3))):
        began = time.monotonic()
        try:
            print("child", method, manager.call_service_sync("loc", method, args, timeout=5))
        except ServiceStoppedError as exc:
            print("child", method, "refused", round(time.monotonic() - began, 1), exc.may_have_run, str(exc))
    try:
        manager.call_service_async("loc", "get", ("a",), timeout=5).result(10)
    except ServiceStoppedError:
        print("child async refused")
    print("child kv", manager.call_service_sync("kv", "get", ("a",), timeout=10))
    env.get_task("loc").start_service()  # the child's own instance, from the factory
    own = env.manager()
    own.call_service_sync("loc", "put", ("a", 30))
    print("child own", own.call_service_sync("loc", "get", ("a",)))
    env.stop()  # a pre-forked worker's shutdown: lets go of the parent's services, stops its own
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
print("parent loc", manager.call_service_sync("loc", "get", ("a",), timeout=10))
print("parent kv", manager.call_service_sync("kv", "get", ("a",), timeout=10), env.get_task("kv").pid == host)
print("parent pid", os.getpid())
env.stop()
"""


def test_a_forked_child_lets_go_of_the_parents_services_and_is_refused_the_in_process_ones() -> None:
    result = run_python(INHERITED)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # Before: get ran inline on the child's copy of the instance and put waited in a pool with no
    # threads until its timeout; env.stop() in the child stopped the parent's process host.
    for method, line in zip(("get", "put"), lines[:2], strict=True):
        words = line.split(maxsplit=5)
        assert words[:3] == ["child", method, "refused"], lines
        assert float(words[3]) < 2.0 and words[4] == "False", lines
        assert f"process {lines[-1].split()[-1]}," in words[5] and "forked" in words[5], lines
    assert lines[2:5] == ["child async refused", "child kv 1", "child own 30"], lines
    assert lines[5:7] == ["parent loc 2", "parent kv 1 True"], lines


MONITORED = """
import os, time
import kservice
from tests.observability.services import Poisonable

FAST = {"health": {"period": 0.02, "timeout": 1.0, "failure_threshold": 2}}
parent = kservice.ServiceEnvironment("parent", FAST)
parent.register_service("p", Poisonable)
parent.start()  # the parent's health scheduler runs
pid = os.fork()
if pid == 0:
    with kservice.ServiceEnvironment("child", FAST) as env:
        task = env.register_service("q", Poisonable)
        env.manager().call_service_sync("q", "poison")
        deadline = time.monotonic() + 10
        while task.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        print("child restarts", task.restarts, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
parent.manager().call_service_sync("p", "poison")
deadline = time.monotonic() + 10
while parent.get_task("p").restarts == 0 and time.monotonic() < deadline:
    time.sleep(0.02)
print("parent restarts", parent.get_task("p").restarts)
parent.stop()
"""


def test_a_forked_child_checks_the_health_of_the_services_it_starts() -> None:
    result = run_python(MONITORED)
    assert result.returncode == 0, result.stderr
    # Before: the child added its task to the parent's health scheduler, whose thread did not come along.
    assert result.stdout.split() == ["child", "restarts", "1", "parent", "restarts", "1"], result.stdout


BACKLOGGED = """
import gc, os, signal, sys, time
import kservice

service = {"class": "tests.core.services:Recorder", "kind": "process", "mmap": {"request_queue_capacity": 4096}}
env = kservice.ServiceEnvironment("backlogged", {"services": {"rec": service}})
env.start()
manager = env.manager()
manager.call_service_sync("rec", "work", ("warm",))
host = env.get_task("rec").pid
os.kill(host, signal.SIGSTOP)  # its ring fills: later async calls wait in the connection's backlog
futures = [manager.call_service_async("rec", "work", (f"p{i}",), timeout=30) for i in range(200)]
pid = os.fork()
if pid == 0:
    try:
        print("child", manager.call_service_async("rec", "work", ("child",), timeout=10).result(15), flush=True)
    except Exception as exc:
        print("child", type(exc).__name__, exc, flush=True)
    del manager
    gc.collect()
    sys.exit(0)  # a normal exit: the exit handlers and finalizers the child inherited run
time.sleep(0.5)  # the child's call meets the full ring too
os.kill(host, signal.SIGCONT)
print("parent", sum(f.result(30) == f"p{i}" for i, f in enumerate(futures)), flush=True)
os.waitpid(pid, 0)
ran = [event.split()[1] for event in manager.call_service_sync("rec", "ran", timeout=10) if event.startswith("start")]
print("runs", len(ran), len(set(ran)), "child" in ran)
env.stop()
"""


def test_a_child_forked_while_calls_wait_for_room_sends_its_own_and_never_the_parents() -> None:
    result = run_python(BACKLOGGED)
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.strip().splitlines())
    # Before: the child's call waited behind the parent's sender thread, which did not come along, and
    # timed out (sending the backlog it inherited would have run the parent's 200 calls twice); and the
    # child removed the parent's sync response ring, so the parent's next sync call ("ran") timed out.
    assert lines == ["child child", "parent 200", "runs 202 202 True"], lines


FORK_POOL = """
import multiprocessing, time
import kservice

# The host looks for callers' rings gone every 0.05 s (5 s by default): a ring removed is soon unmapped.
kv = {"class": "tests.core.services:KeyValue", "kind": "process", "mmap": {"caller_ring_check": 0.05}}
env = kservice.ServiceEnvironment("pool", {"services": {"kv": kv}})
env.start()
manager = env.manager()
manager.call_service_sync("kv", "put", ("parent", 0))  # this thread's response ring exists before the fork


def work(i):
    manager.call_service_sync("kv", "put", (f"w{i}", i))
    return manager.call_service_sync("kv", "get", (f"w{i}",))


with multiprocessing.get_context("fork").Pool(2) as pool:
    print("workers", sum(pool.map(work, range(20))))
time.sleep(0.5)
print("parent", len(manager.call_service_sync("kv", "keys", timeout=10)))
env.stop()
from kservice.plugins.mmap import reclaim
reclaim()  # fork workers end with os._exit: their own response rings are left to reclaim
"""


def test_fork_pool_workers_calling_the_parents_services_leave_the_parents_calls_working() -> None:
    result = run_python(FORK_POOL)
    assert result.returncode == 0, result.stderr
    # Before: a worker dropping the parent's thread-local ring records removed the parent's response ring,
    # and the parent's next sync call timed out.
    assert result.stdout.split() == ["workers", "190", "parent", "21"], result.stdout


LOCKS_HELD = """
import os, signal, threading, time
import kservice
from kservice import _errors, _future, _plugins, _stream
from kservice.middleware import metrics
from kservice.plugins import breaker, cache, fallback, retry
from kservice.plugins.mmap import ring

env = kservice.ServiceEnvironment("locks", {"services": {"kv": {"class": "tests.core.services:KeyValue", "kind": "process"}}})
env.start()
manager = env.manager()
manager.call_service_async("kv", "get", ("a",)).result(10)
locks = [_future.future_lock, metrics._recorders_lock, retry._budgets_lock, retry._policies_lock,
         breaker._breakers_lock, cache._lock, fallback._lock, _errors._call_error_lock, _plugins._manager_lock,
         _plugins.get_plugin_manager()._lock, _stream._executors_lock, ring._sweep_lock, env._lock]
locks += [recorder.lock for recorder in metrics._recorders.values()]
locks += [budget._lock for budget in retry._budgets.values()] + [b._lock for b in breaker._breakers.values()]
held, release = threading.Event(), threading.Event()

def hold():  # another thread of the parent, inside kservice's locks at the instant of the fork
    for lock in locks:
        lock.acquire()
    held.set()
    release.wait()
    for lock in locks:
        lock.release()

holder = threading.Thread(target=hold)
holder.start()
held.wait()
pid = os.fork()
if pid == 0:
    try:
        from kservice import _asynccall
        one = _asynccall._claiming is _future.future_lock is _future._condition_creation
        print("renewed", one and _future.future_lock not in locks, type(env._lock).__name__, flush=True)
        print("async", manager.call_service_async("kv", "get", ("a", 1), timeout=5).result(5), flush=True)
        print("sync", manager.call_service_sync("kv", "get", ("a", 2), timeout=5), flush=True)
        other = threading.Thread(target=lambda: print("thread", manager.call_service_sync("kv", "get", ("a", 3)), flush=True))
        other.start()
        other.join()
        try:
            manager.call_service_sync("kv", "fail", ("on purpose",), timeout=5)
        except Exception as exc:
            print("failed", type(exc).__name__, exc.may_have_run if hasattr(exc, "may_have_run") else "", flush=True)
        env.stop()
        print("stopped", flush=True)
    except BaseException as exc:
        print("child failed:", type(exc).__name__, exc, flush=True)
    finally:
        os._exit(0)
release.set()
holder.join()
deadline = time.monotonic() + 20
while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
    time.sleep(0.05)
else:
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("child hung", flush=True)
print("parent", manager.call_service_sync("kv", "get", ("a", 4)))
env.stop()
from kservice.plugins.mmap import reclaim
reclaim()  # the child ended with os._exit (or was killed): its response rings are left to reclaim
"""


def test_a_child_forked_while_another_thread_holds_kservices_locks_makes_its_calls() -> None:
    result = run_python(LOCKS_HELD)
    assert result.returncode == 0, result.stderr
    # Before: the child waited for ever on a lock whose holder (a thread of the parent) did not come along.
    lines = result.stdout.splitlines()
    # One lock under three names stays one (new) lock, and a reentrant lock stays reentrant.
    assert lines[0] == "renewed True RLock", result.stdout
    assert lines[1:4] == ["async 1", "sync 2", "thread 3"], result.stdout
    assert lines[4].startswith("failed ") and lines[5:] == ["stopped", "parent 4"], result.stdout
