"""Streams over the mmap transport: a generator's items travel through a response ring of the caller's.

Opening a stream sends an ordinary call record whose metadata carries
:data:`STREAM_KEY` (the window) and whose response queue is a *stream ring*:
a ring of the caller's used by one stream at a time (kept in a small
per-process pool, so opening a stream creates no shared memory once warm).
The host runs the generator (``task.open_stream``) and puts each item into
that ring as a response record ``(request_id, item)``, large items out of
band as results are; the end of the stream is one full response record (a
success, or the error). Items travel as they come, one record each (the ring
reader takes up to 256 records per wake-up): an item is never held back for a
later step of the generator, so a host that dies in that step has sent every
item made before it. A plain success end (no metadata) travels as the short
record ``(request_id, None, PLAIN_END)``, as short as a call's reply.

Flow control: the host sends at most ``window`` items the caller has not
consumed; the caller returns credit (a :data:`KIND_CREDIT` record on the
service's request ring) every half window consumed. A caller that closes the
stream early sends :data:`KIND_CANCEL`: the host stops the generator (its
``finally`` runs). A stale record of an earlier stream left in a pooled ring
is recognised by its request id and dropped (its out-of-band segment
released). A host that dies mid-stream ends the stream with
ServiceUnavailableError within about a second (the caller checks the host's
liveness while it waits); a caller that dies stops the host's producer within
about a second too (the host checks the caller's ring owner while it waits
for credit).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any

from kservice import ServiceRequest, ServiceResponse, ServiceUnavailableError, SinkBusy, StreamSink, StreamSource

from . import codec, transport
from .ring import QueueClosed, QueueEmpty, QueueError, QueueFull, ShmQueue, create_queue

if TYPE_CHECKING:
    from .transport import MmapConnection, MmapListener

log = logging.getLogger("kservice.mmap")

#: request metadata key marking a call as a stream (its value: the window)
STREAM_KEY = codec.STREAM_KEY
#: control records on a service's request ring: credit for a stream, and a stream's cancellation (one
#: numbering of record kinds for the whole wire, in the codec)
KIND_CREDIT = codec.KIND_STREAM_CREDIT
KIND_CANCEL = codec.KIND_STREAM_CANCEL
#: data capacity of one stream ring
STREAM_RING_CAPACITY = 1 << 20
#: idle stream rings a process keeps for its next streams
POOLED_RINGS = 8
#: seconds between liveness checks of the other side while waiting
LIVENESS_INTERVAL = 0.5
#: str/bytes items shorter than this take the direct path (pickled in place, always inline)
_SMALL_ITEM = 4096
_dumps = pickle.dumps
_loads = pickle.loads
#: third field of a stream record ``(request_id, None, PLAIN_END)``: the stream's end, a success with
#: nothing else to say (no metadata), in a record as short as a call's reply, read without the general decoder
PLAIN_END = True


# =========================================================================== caller side


class _RingPool:
    """This process's idle stream rings (unlinked when its last mmap connection closes, and at exit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[ShmQueue] = []

    def acquire(self) -> ShmQueue:
        # Without the lock: list.pop is atomic, and the drains below pop too, so each idle ring goes to
        # exactly one taker (a stream, or its removal). One lock less per stream (first-item latency).
        try:
            return self._idle.pop()
        except IndexError:
            return create_queue(f"str.{os.getpid()}.{os.urandom(4).hex()}", STREAM_RING_CAPACITY)

    def release(self, ring: ShmQueue) -> None:
        with self._lock:
            # The transport counts the connections (it imports this module with the first stream only).
            if transport._client.open_connections > 0 and len(self._idle) < POOLED_RINGS:
                self._idle.append(ring)
                return
        _remove(ring)

    def shutdown(self) -> None:
        self._drain()

    def _drain(self) -> None:
        """Remove every idle ring, one pop at a time (as ``acquire`` takes them: never one ring twice)."""
        while True:
            try:
                ring = self._idle.pop()
            except IndexError:
                return
            _remove(ring)

    def forget_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._idle = []


def _remove(ring: ShmQueue) -> None:
    _drain(ring)
    with contextlib.suppress(Exception):
        ring.unlink()
        ring.close()


def _drain(ring: ShmQueue) -> None:
    """Release what records still in ``ring`` hold (their out-of-band segments)."""
    while True:
        try:
            records = ring.get_many(256, 0)
        except Exception:  # noqa: BLE001 - empty, closed or corrupt: nothing more to release
            return
        for record in records:
            codec.discard(record)


pool = _RingPool()
atexit.register(pool.shutdown)
os.register_at_fork(after_in_child=pool.forget_after_fork)


def _control_record(kind: int, request: ServiceRequest, count: int = 0) -> bytes:
    return pickle.dumps((kind, request.request_id, request.service_name, "", (count,), {}, "", None, {}), 5)


class MmapStreamSource(StreamSource):
    """The caller's end of one stream over mmap (see the module docstring)."""

    def __init__(
        self, connection: MmapConnection, service_ring: ShmQueue, request: ServiceRequest, window: int
    ) -> None:
        self._connection = connection
        self._service_ring = service_ring
        self._request = request
        # A ring goes back to the pool only once no thread reads it any more: an async consumer's
        # receive runs in an executor thread, which may still be waiting on it when the stream closes.
        self._guard = threading.Lock()
        self._readers = 0
        self._parked: tuple[ShmQueue, bool] | None = None
        self._ring: ShmQueue | None = pool.acquire()
        self._credit_every = max(1, window // 2)
        self._owed = 0
        self._ended = False
        # The request travels with the window in its metadata: set for the encoding only (this stream's
        # own request, read by no other thread meanwhile), so no copy of the request is made.
        metadata = request.metadata
        request.metadata = {**metadata, STREAM_KEY: window}
        try:
            record, segment = codec.encode_request(
                request, self._ring.name, connection._owner_pid, connection._inline_limit
            )
        except BaseException as exc:  # noqa: BLE001 - whatever pickling raises
            self._release()
            raise connection._not_picklable(request, exc).to_exception() from None
        finally:
            request.metadata = metadata
        put = service_ring._compiled_put  # as a call's: the compiled put first (0: queued)
        failed = connection._put(service_ring, request, record, segment) if put is None or put(record) else None
        #: the refusal to give at the first receive (the request could not be queued), else None
        self._failed: ServiceResponse | None = failed
        if failed is not None:
            self._release()

    def receive(self, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        with self._guard:
            if self._failed is not None:
                failed, self._failed = self._failed, None
                self._ended = True
                return [], failed
            ring = self._ring
            if ring is None:
                return [], None
            self._readers += 1
        try:
            return self._receive(ring, timeout)
        finally:
            self._read_done()

    def _read_done(self) -> None:
        """A read of the ring ended: the last reader gives back a ring the stream released meanwhile."""
        with self._guard:
            self._readers -= 1
            parked = self._parked if not self._readers else None
            if parked is not None:
                self._parked = None
        if parked is not None:
            _give_back(*parked)

    def _receive(self, ring: ShmQueue, timeout: float | None) -> tuple[list[Any], ServiceResponse | None]:
        wait = LIVENESS_INTERVAL if timeout is None else min(timeout, LIVENESS_INTERVAL)
        try:
            records = ring.get_many(256, max(wait, 0.0))
        except QueueEmpty:
            # After a wait, look at the host (a poll, as close() makes, waited for nothing: the look costs
            # a /proc read, several µs, and the next wait makes it).
            if wait > 0 and not self._service_ring.owner_alive:
                return [], self._broken(f"its host process (pid {self._service_ring.owner_pid}) died mid-stream")
            return [], None
        except QueueError as exc:  # a corrupted ring dropped the bad bytes
            log.warning("mmap stream ring %s: %s", ring.name, exc)
            return [], None
        request_id = self._request.request_id
        items, ended = _parse(records, request_id)
        if ended is None:
            return items, None
        self._ended = True
        self._release()
        if ended is PLAIN_END:
            return items, ServiceResponse(True, None, None, request_id)
        return items, codec.response_from_message(ended)

    def _broken(self, why: str) -> ServiceResponse:
        self._ended = True
        self._release(reuse=False)
        response = ServiceResponse.from_exception(
            self._request.request_id,
            ServiceUnavailableError(f"stream {self._request.service_name}.{self._request.method_name} broke: {why}"),
            origin="runtime",
        )
        response.metadata = {"kservice.retryable": False}  # the generator may have run: never re-sent
        return response.for_wire()

    def consumed(self, count: int) -> None:
        self._owed += count
        if self._owed >= self._credit_every and not self._ended:
            owed, self._owed = self._owed, 0
            self._control(KIND_CREDIT, owed)

    def _control(self, kind: int, count: int = 0) -> None:
        try:
            self._service_ring.put(_control_record(kind, self._request, count), 1.0)
        except (QueueError, ValueError) as exc:
            log.info("mmap stream %s: could not reach the host (%s)", self._request.request_id, exc)

    def close(self) -> None:
        with self._guard:
            ring, self._ring = self._ring, None
            if ring is None:
                return
            shared = self._readers > 0
            if shared:
                self._parked = (ring, True)  # the reader still in it gives the ring back
        if not self._ended:
            self._ended = True
            # One look for an end already sent (a short stream): then the host has nothing to stop. Not while
            # another thread reads the ring (an async consumer's receive): that read may be taking the end.
            if shared or not _end_in(ring, self._request.request_id):
                self._control(KIND_CANCEL)  # a host that ended the stream meanwhile ignores it
        if not shared:
            _give_back(ring, True)

    def _release(self, reuse: bool = True) -> None:
        with self._guard:
            ring, self._ring = self._ring, None
            if ring is None:
                return
            if self._readers:
                self._parked = (ring, reuse)  # the last reader gives it back when it returns
                return
        _give_back(ring, reuse)


def _parse(records: list[bytes], request_id: str) -> tuple[list[Any], Any]:
    """The items of stream ``request_id`` in ``records``, and its end if there: None, :data:`PLAIN_END`, or the
    end's message (for ``codec.response_from_message``). Records of earlier streams of the ring and those after
    the end are dropped (their out-of-band segments released); an undecodable record is logged and skipped."""
    items: list[Any] = []
    for index, record in enumerate(records):
        if record[:1] == b"\x80":
            # An inline record: most often one item, read here without the general decoder.
            try:
                message = _loads(record)
            except BaseException:  # noqa: BLE001 - the general decoder reports it below
                message = None
            if type(message) is tuple and len(message) == 2:
                if message[0] == request_id:
                    items.append(message[1])
                continue
            if type(message) is tuple and len(message) == 3 and message[2] is PLAIN_END:
                if message[0] == request_id:
                    _drop(records, index + 1)
                    return items, PLAIN_END
                continue
        try:
            messages = codec.decode_many(record)
        except codec.DecodeError as exc:
            log.warning("mmap stream %s: skipped an undecodable record: %s", request_id, exc)
            continue
        for message in messages:
            if message[0] != request_id:
                continue  # a late record of an earlier stream that used this ring
            if len(message) == 2:
                items.append(message[1])
            else:
                _drop(records, index + 1)
                return items, message
    return items, None


def _end_in(ring: ShmQueue, request_id: str) -> bool:
    """Whether stream ``request_id``'s end is in ``ring`` (one look, no wait); what the look takes out is dropped."""
    try:
        records = ring.get_many(256, 0)
    except Exception:  # noqa: BLE001 - empty, closed or corrupt: undecided
        return False
    return _parse(records, request_id)[1] is not None


def _drop(records: list[bytes], start: int) -> None:
    for record in records[start:]:
        codec.discard(record)


def _give_back(ring: ShmQueue, reuse: bool) -> None:
    if reuse:
        pool.release(ring)  # late records of this stream are dropped by the ring's next stream
    else:
        _remove(ring)


# =========================================================================== host side


class MmapStreamSink(StreamSink):
    """The host's end of one stream: items go to the caller's stream ring (see the module docstring)."""

    liveness_interval = LIVENESS_INTERVAL

    def __init__(self, listener: MmapListener, request: ServiceRequest, ring: ShmQueue, window: int) -> None:
        super().__init__(window)
        self._listener = listener
        self._request = request
        self._ring = ring
        self._inline_limit = ring.max_record // 4

    def consumer_alive(self) -> bool:
        return bool(self._ring.owner_alive)

    def _emit(self, item: Any) -> None:
        kind = type(item)
        if kind is str or kind is bytes or kind is int or kind is float or kind is bool or item is None:
            # The common token or chunk: pickled here at once (what codec.encode_response does for it).
            if (kind is not str and kind is not bytes) or len(item) < _SMALL_ITEM:
                record = _dumps((self._request.request_id, item), 5)
                put = self._ring._compiled_put
                if put is not None and not put(record):
                    return
                self._put(record, None)
                return
        response = ServiceResponse(True, item, None, self._request.request_id)
        try:
            record, segment = codec.encode_response(response, self._ring.owner_pid, self._inline_limit)
        except BaseException as exc:  # noqa: BLE001 - whatever pickling raises
            raise TypeError(
                f"an item of stream {self._request.service_name}.{self._request.method_name} cannot be sent to the "
                f"caller: its type {type(item).__module__}.{type(item).__qualname__} is not picklable "
                f"({type(exc).__name__}: {exc}); the stream ends here"
            ) from None
        self._put(record, segment)

    def _put(self, record: bytes, segment: str | None) -> None:
        if self.in_place:
            # Made in the listener thread, which must never wait for a caller: a full ring defers it.
            try:
                self._ring.put(record, 0)
                return
            except QueueFull:
                codec.unlink_segment(segment)
                raise SinkBusy from None
            except (QueueError, ValueError):
                pass  # closed or gone: the waiting path below reports it
        deadline = self._request.deadline
        while True:
            wait = LIVENESS_INTERVAL if deadline is None else min(LIVENESS_INTERVAL, deadline - time.time())
            try:
                self._ring.put(record, max(0.0, wait))
                return
            except QueueClosed:
                codec.unlink_segment(segment)
                self.cancel()
                raise ConnectionError("the caller's stream ring is closed") from None
            except (QueueError, ValueError, OSError) as exc:  # OSError: closed under a wait (caller gone)
                if (deadline is not None and time.time() >= deadline) or not self._ring.owner_alive:
                    codec.unlink_segment(segment)
                    self.cancel()
                    raise ConnectionError(f"the caller's stream ring stayed full or went away ({exc})") from None

    def _finish(self, response: ServiceResponse) -> None:
        self._listener_streams().pop(self._request.request_id, None)
        if self.cancelled and self.stop_reason is None:
            return  # the caller closed the stream: nobody reads its end
        response.request_id = self._request.request_id
        records: list[tuple[bytes, str | None]]
        if response.success and not response.metadata:
            # A plain success end: one record as short as a call's reply (see PLAIN_END).
            records = [(_dumps((response.request_id, None, PLAIN_END), 5), None)]
        else:
            if response.exception is not None:
                response = response.for_wire()
            if not response.metadata:
                response.metadata = {"kservice.stream.end": True}  # an end always travels as a full response
            records = [codec.encode_response(response, self._ring.owner_pid, self._inline_limit)]
        if self.in_place:
            put = self._ring._compiled_put  # as for items: the compiled put first (0: published)
            while records:
                try:
                    if put is None or put(records[0][0]):
                        self._ring.put(records[0][0], 0)
                except (QueueError, ValueError):
                    # The end of a stream made in the listener thread, with the ring full: sent from a thread
                    # of its own, which may wait (rare: a caller not reading a short stream of big items).
                    self.in_place = False
                    threading.Thread(target=self._put_quietly, args=(records,), name="stream-end", daemon=True).start()
                    return
                del records[0]
            return
        self._put_quietly(records)

    def _put_quietly(self, records: list[tuple[bytes, str | None]]) -> None:
        for index, (record, segment) in enumerate(records):
            try:
                self._put(record, segment)
            except ConnectionError:
                for _, later in records[index + 1 :]:
                    codec.unlink_segment(later)
                return

    def _listener_streams(self) -> dict[str, MmapStreamSink]:
        return streams_of(self._listener)


def streams_of(listener: MmapListener) -> dict[str, MmapStreamSink]:
    """The streams a listener is producing, by request id."""
    found: dict[str, MmapStreamSink] | None = getattr(listener, "_stream_sinks", None)
    if found is None:
        found = listener._stream_sinks = {}  # type: ignore[attr-defined]
    return found


def open_stream(listener: MmapListener, request: ServiceRequest) -> None:
    """Serve a stream request that arrived on ``listener``'s ring."""
    # The request was decoded here: its metadata is its own (the window is taken out of it in place).
    window = int(request.metadata.pop(STREAM_KEY, 64) or 64)
    ring = listener._responder(request.response_queue_name) if request.response_queue_name else None
    if ring is None:
        return  # the caller is gone already
    sink = MmapStreamSink(listener, request, ring, window)
    streams_of(listener)[request.request_id] = sink
    listener._task.open_stream(request, sink)


def control(listener: MmapListener, kind: int, request: ServiceRequest) -> None:
    """A credit or cancellation record for a stream ``listener`` produces (unknown streams are ignored)."""
    sink = streams_of(listener).get(request.request_id)
    if sink is None:
        return
    if kind == KIND_CREDIT:
        count = request.args[0] if request.args and type(request.args[0]) is int else 0
        sink.acknowledge(count)
    elif kind == KIND_CANCEL:
        sink.cancel()
