"""The wire format between callers and replicas: envelopes and plain results pickled by the standard library, the rest through Ray."""

from __future__ import annotations

import io
import pickle
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeAlias

from kservice import (
    ServiceRequest,
    ServiceResponse,
)

from .common import _first_line

_COST = struct.Struct("<d")
#: what a replica speaks, in its ready/describe answers: 2 adds the run-time trailer and ``handle_batch``
#: (a deployment started by an older version answers without it, and its calls are never batched);
#: 3 adds streams whose Ray objects carry several items (``handle_stream``'s ``per_object``); 4 adds the
#: caller's wall clock when it sends (``sent_at``) to ``handle``, ``handle_batch`` and ``handle_stream``, by
#: which the replica reads each deadline on its own clock (see :func:`clock_offset`)
WIRE_VERSION = 4


def with_clock(wire: int, *args: Any) -> tuple[Any, ...]:
    """A call's arguments as a replica of wire version ``wire`` takes them: from 4, this process's wall clock
    last (``sent_at``, read now, as the call leaves: see :func:`clock_offset`)."""
    return (*args, time.time()) if wire >= 4 else args


def clock_offset(sent_at: Any) -> float | None:
    """Seconds to add to a caller's deadlines to read them on this process's wall clock, on a call's arrival.

    ``sent_at`` is the caller's wall clock when it sent the call (wire version
    4). Deadlines are wall-clock times, and the clocks of a cluster's
    machines disagree (by milliseconds under NTP, by seconds on a node whose
    sync broke or a virtual machine resumed). Read as sent, a replica ahead of
    the caller by more than the timeout refused every call as past its
    deadline ("it did not run") and one behind let work run long after its
    caller gave up. The replica instead gives each call the time its caller
    had left when it sent it, counted from the call's arrival, as gRPC does
    with its timeout header; the calls of one batch arrive together and share
    one offset. The time a call spent travelling (Ray's scheduling, the
    network) is not counted, so the replica may start a call up to that much
    after its caller's deadline, never before it. A call Ray runs again on a
    restarted replica (an idempotent method) carries the ``sent_at`` of its
    first sending: it gets the time left then, from its new arrival (its
    caller's own deadline still ends the caller's wait). None (a caller of
    wire version 3 or older): deadlines are read as sent.
    """
    return time.time() - sent_at if type(sent_at) is float else None


def stream_shape(window: int) -> tuple[int, int]:
    """How a stream of ``window`` items travels: (items per Ray object at most, Ray objects ahead of the caller).

    Ray's streaming generator costs the same per object whatever it carries
    (hundreds of microseconds on one host), so a replica whose generator makes
    items quickly sends several per object. What was made ahead of the
    consumer stays within ``window`` items (one more when ``window`` < 8, as
    with one item per object): the objects Ray holds, the batch the replica is
    filling, and the one the caller is handing out.
    """
    per_object = max(1, min(64, window // 4))
    if per_object == 1:
        return 1, max(1, window)
    return per_object, window // per_object - 2


#: the fields of a request as they travel: (request_id, method_name, args, kwargs, deadline, metadata)
WireRequest: TypeAlias = tuple[str, str, tuple[Any, ...], dict[str, Any], float | None, dict[str, Any]]
#: what comes back: bytes (a plain success, pickled by :func:`_pack`, then its run time), a 1-tuple (a plain success Ray
#: serialized), or the whole ServiceResponse (failures, and successes carrying metadata or marked degraded)
WireResponse: TypeAlias = "bytes | tuple[Any] | ServiceResponse"


@dataclass(frozen=True)
class _Stored:
    """A batched call's result that Ray stored on its own (see :meth:`_ReplicaHost.handle_batch`)."""

    ref: Any


class _RaySerializationNeeded(Exception):
    """Raised while pickling a value that only Ray's own serializer handles correctly."""


class _EnvelopePickler(pickle.Pickler):
    """The stdlib C pickler, refusing what Ray serializes differently.

    Ray moves a ``bytes`` argument or result as raw bytes, but a tuple, str or
    dict through msgpack plus cloudpickle, which costs about 10 µs per object
    on each side (measured: ``tests/benchmarks/bench_ray.py``); a call's
    envelope and result pickled here travel as bytes. Values this pickler
    could get wrong go through Ray instead: Ray handles (ObjectRefs and actor
    handles need Ray's reference counting), any type with a Ray or cloudpickle
    reducer (``ray.util.register_serializer`` included), classes and functions
    of ``__main__`` (cloudpickle sends them by value; the other side has
    another ``__main__``), and out-of-band buffers (numpy arrays: Ray avoids a
    copy). ``reducer_override`` runs only for objects that are not of a
    builtin type, so plain envelopes never call back into Python.
    """

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _ray_reduced_types():
            raise _RaySerializationNeeded(kind.__qualname__)
        module = getattr(obj if isinstance(obj, type) or callable(obj) else kind, "__module__", None)
        if module == "__main__" or (_by_value_modules and _pickled_by_value(module)):
            raise _RaySerializationNeeded(f"{kind.__qualname__} of {module}")
        return NotImplemented


def _by_value_module_names() -> set[str]:
    """Modules registered with ``cloudpickle.register_pickle_by_value`` (the live set; empty if unknown)."""
    try:
        from ray.cloudpickle import cloudpickle as vendored
    except ImportError:
        return set()
    names = getattr(vendored, "_PICKLE_BY_VALUE_MODULES", None)
    return names if isinstance(names, set) else set()


def _pickled_by_value(module: str | None) -> bool:
    while module:
        if module in _by_value_modules:
            return True
        module = module.rpartition(".")[0]
    return False


def _refuse_buffer(buffer: pickle.PickleBuffer) -> None:
    raise _RaySerializationNeeded("out-of-band buffer")


_ray_reduced: frozenset[type] = frozenset()
_ray_reduced_source: Any = None
_ray_reduced_size = -1


def _ray_reduced_types() -> frozenset[type]:
    """Types Ray's cloudpickle reduces its own way (read again when Ray registers another)."""
    global _ray_reduced, _ray_reduced_source, _ray_reduced_size, _by_value_modules
    source = _ray_reduced_source
    if source is None or len(source) != _ray_reduced_size:
        import copyreg

        from ray.cloudpickle import CloudPickler

        _by_value_modules = _by_value_module_names()

        table = CloudPickler.dispatch
        # Ray registers into the first map of cloudpickle's ChainMap; its size says when to read again.
        source = table.maps[0] if hasattr(table, "maps") else table
        _ray_reduced = frozenset(t for t in table if copyreg.dispatch_table.get(t) is not table[t])
        _ray_reduced_source, _ray_reduced_size = source, len(source)
    return _ray_reduced


_picklers = threading.local()
_by_value_modules: set[str] = set()


class Unpicklable(TypeError):
    """A value whose pickling raised SystemExit, KeyboardInterrupt or another exception that is no ``Exception``.

    Ray's serializer would run the same code and raise it too, which ends a
    replica's actor: such a value cannot travel at all.
    """


def _pack(value: Any) -> bytes | None:
    """``value`` pickled by :class:`_EnvelopePickler`, or None when Ray must serialize it.

    Raises only :class:`Unpicklable`: when pickling raised what no serializer
    gets past (SystemExit, KeyboardInterrupt, ...).
    """
    # One pickler per thread, reused (half the cost of a new one); taken out while in use, so a
    # __reduce__ that itself makes a call through this transport gets a fresh one.
    pair: tuple[io.BytesIO, _EnvelopePickler] | None = _picklers.__dict__.pop("pair", None)
    if pair is None:
        buffer = io.BytesIO()
        pair = (buffer, _EnvelopePickler(buffer, 5, buffer_callback=_refuse_buffer))
    buffer, pickler = pair
    try:
        pickler.dump(value)
        return buffer.getvalue()
    except Exception:
        # Not picklable here (or refused): Ray's serializer decides, and reports what it cannot handle.
        return None
    except BaseException as exc:  # noqa: BLE001 - the value's own code raised SystemExit & co.
        raise Unpicklable(f"it is not picklable ({type(exc).__name__}: {exc})") from None
    finally:
        buffer.seek(0)
        buffer.truncate()
        pickler.clear_memo()
        _picklers.pair = pair


#: What an empty kwargs / metadata travels as (see _to_wire): plain dicts, never changed.
_NO_KWARGS: dict[str, Any] = {}
_NO_METADATA: dict[str, Any] = {}


def _to_wire(request: ServiceRequest) -> bytes | WireRequest:
    # The service name is known to the replica. Empty dicts travel as these two plain ones.
    kwargs = request.kwargs if request.kwargs else _NO_KWARGS
    metadata = request.metadata if request.metadata else _NO_METADATA
    fields = (request.request_id, request.method_name, request.args, kwargs, request.deadline, metadata)
    packed = _pack(fields)
    return fields if packed is None else packed


def _claimed(request: ServiceRequest, answer: ServiceResponse) -> ServiceResponse:
    """``answer`` as ``request``'s: a replica that could not read the envelope (see
    ``_ReplicaHost._request``) answers without the call's id and name, filled in here."""
    if not answer.request_id:
        answer.request_id = request.request_id
        answer.error = f"{request.service_name}.{request.method_name}: {answer.error}"
    return answer


def _from_wire(request: ServiceRequest, answer: WireResponse) -> ServiceResponse:
    """The response ``answer`` (from :meth:`_ReplicaHost.handle`) stands for; never raises."""
    if type(answer) is bytes:
        try:
            return ServiceResponse(True, pickle.loads(answer), None, request.request_id)
        except Exception as exc:
            # E.g. the result's class is not importable in this process.
            response = ServiceResponse.from_exception(request.request_id, exc, origin="service")
            response.error = f"the result of {request.service_name}.{request.method_name} could not be unpickled here: {_first_line(exc)}"
            return response
    if isinstance(answer, ServiceResponse):
        return _claimed(request, answer)
    return ServiceResponse(True, answer[0], None, request.request_id)
