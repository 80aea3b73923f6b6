"""How requests and responses travel through the shared-memory rings.

A message is a plain tuple pickled with protocol 5 (tuples are cheaper to
pickle than the dataclasses, and the layout is private to this module).
Requests are 9-tuples. A successful response without metadata is the 2-tuple
``(request_id, result)``; any other response is a 9-tuple of all its fields.
A record in a ring is one of:

``\\x80...`` (an inline record)
    The pickle itself (every protocol-5 pickle starts with ``\\x80``): one
    message, or a *batch*, a list of response messages (a listener answering
    several requests of one caller at once writes one record).

``O`` + header (an out-of-band record in a one-shot segment)
    Large buffers (``bytes``/``bytearray`` arguments, keyword values and
    results of at least :data:`OUT_OF_BAND_THRESHOLD` bytes, and any
    protocol-5 ``PickleBuffer`` such as a contiguous numpy array) are written to
    a separate shared-memory *segment* and only their lengths travel in the
    ring; a pickle too large for the ring travels in the segment too. The
    segment is a file ``oob-<sender pid>-<receiver pid>-<token>.seg`` in the
    per-user queue directory, created 0600. The receiver opens it, checks that
    it belongs to this user and is private, unlinks it at once and maps it
    copy-on-write: a numpy array arrives without a copy, ``bytes`` with one.

``P`` + header (an out-of-band record in a pooled segment)
    The same, written into one of the sender's *pooled* segments
    (``pool-<sender pid>-<token>.seg``, at most :data:`POOL_SEGMENTS` per
    process, each at most :data:`POOL_MAX_SEGMENT` bytes). Creating a fresh
    tmpfs file costs far more than the copy itself (every page is allocated
    and zeroed: ~11 ms for 16 MiB against ~2 ms to copy), so pooled segments
    stay mapped in both processes and are reused. A segment's header holds a
    *lease* word: the sender sets it to the record's sequence number before
    writing, the receiver checks it against the record, copies the data out
    (``bytes``/``bytearray`` values are built straight from the mapping, other
    buffers such as numpy arrays get one private copy) and clears it; only
    then does the sender reuse the segment. Payloads too big for the pool, or
    sent while every pooled segment is leased, use a one-shot segment.

Guarantees: a one-shot segment is unlinked exactly once by whoever sees it
last: the receiver when it reads (or discards) the record, the sender when the
record could not be queued, the janitor (:func:`reclaim_segments`) when its
receiver died first. A pooled segment's lease is cleared by the receiver when
it reads or discards the record, by the sender when the record could not be
queued, and by the sender itself when the lease's receiver died or the lease
is older than :data:`POOL_LEASE_LOST` seconds (its record was lost). Pooled
segments are unlinked when their process exits (or stops serving calls: see
:func:`release_pool`), and by the janitor when their owner died. Anything that
cannot be decoded raises :class:`DecodeError`, which carries the request id
whenever it could be read, and never leaves a segment leased.

Undecodable payloads: a pickle that names a class the receiver cannot import
(one defined in the sender's ``__main__``, or a module only the sender has) or
whose reconstruction raises is decoded a second time, on that failure path only,
by a lenient unpickler that puts a placeholder in place of every object it
cannot rebuild. What that recovers, the *envelope* (request id, reply address,
service and method names; the request ids of a response record, and the
messages of a batch that did decode), travels on the :class:`DecodeError`, so
the receiver can answer the sender at once instead of dropping the record. The
success path never pays for it.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import io
import itertools
import mmap
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kservice import ServiceRequest, ServiceResponse

try:
    # The C pickler itself (what ``pickle`` re-exports): ``pickle.py`` would add its pure-Python
    # pickler, never used here, to a caller's start (0.6 ms).
    import _pickle as pickle
except ImportError:  # pragma: no cover - an interpreter without it
    import pickle  # type: ignore[no-redef]

from .ring import _pid_alive, entries_of, is_private_file, queue_directory, reserve

__all__ = [
    "KIND_BATCH",
    "KIND_CALL",
    "KIND_CANCEL",
    "KIND_CHUNK",
    "KIND_CHUNK_SINGLE",
    "KIND_STATUS",
    "KIND_STREAM_CANCEL",
    "KIND_STREAM_CREDIT",
    "ORPHAN_SEGMENT_GRACE",
    "OUT_OF_BAND_THRESHOLD",
    "POOL_LEASE_LOST",
    "POOL_MAX_SEGMENT",
    "POOL_SEGMENTS",
    "STREAM_KEY",
    "DecodeError",
    "decode",
    "decode_many",
    "decode_request",
    "decode_request_batch",
    "discard",
    "encode_cancel_request",
    "encode_chunk",
    "encode_chunk_answer",
    "encode_request",
    "encode_request_batch",
    "encode_response",
    "encode_response_batch",
    "holds_placeholder",
    "mapped_segments",
    "reclaim_segments",
    "release_pool",
    "request_from_message",
    "request_id_marker",
    "response_from_message",
    "unlink_segment",
    "unmap_gone_senders",
]

#: Buffers of at least this many bytes travel out of band.
OUT_OF_BAND_THRESHOLD = 256 * 1024
#: Pooled segments per process, and the largest pooled segment (bigger payloads use one-shot segments).
POOL_SEGMENTS = 4
POOL_MAX_SEGMENT = 64 << 20
#: Smallest pooled segment (data bytes).
POOL_MIN_SEGMENT = 1 << 20
#: A lease this old (seconds) is taken to be lost with its record: the segment is dropped, not reused.
POOL_LEASE_LOST = 600.0
#: Seconds the janitor keeps a one-shot segment whose sender died while its receiver lives (the
#: record naming it may still be queued for that receiver); older ones are removed.
ORPHAN_SEGMENT_GRACE = 600.0

#: Message kinds (first field of a request tuple).
KIND_CALL = 1
KIND_STATUS = 2
#: The caller gave up on the request named by the record's request id: never start it.
KIND_CANCEL = 3
#: What :func:`decode_request` answers for a *request batch* record: a list of call messages
#: (``ServiceManager.map`` ships a chunk of calls as one record, see :func:`encode_request_batch`).
KIND_BATCH = 4
#: Stream control records (:mod:`kservice.plugins.mmap.streams`): credit the caller returns to a
#: stream's producer, and a stream the caller closed.
KIND_STREAM_CREDIT = 5
KIND_STREAM_CANCEL = 6
#: Request metadata key marking a call as a stream's opening (its value: the window).
STREAM_KEY = "kservice.stream.window"
#: A *chunk*: many calls of one method in one compact request tuple (see :func:`encode_chunk`).
KIND_CHUNK = 7
#: A chunk whose calls each take one positional argument: ``args`` holds the arguments themselves,
#: not a 1-tuple per call (no tuple per call to build, pickle and unpickle). Sent only to hosts whose
#: ``chunk_records`` is 2 or more.
KIND_CHUNK_SINGLE = 8

_PROTOCOL = 5
_OOB_TAG = 0x4F  # "O": one-shot segment
_POOL_TAG = 0x50  # "P": pooled segment
_OOB_HEAD = struct.Struct("<BBIQ")  # tag, main-in-segment flag, buffer count, main pickle length
_POOL_HEAD = struct.Struct("<BBIQQ")  # the same, then the lease (sequence number)
_LEN = struct.Struct("<Q")
_NAME_LEN = struct.Struct("<H")
_ALIGN = 64
#: Bit 63 of a buffer length in a pooled record: the receiver builds a private copy of it.
_COPY_BIT = 1 << 63
# Patterns, not compiled objects: re compiles (and caches) each on its first use, so importing the
# codec compiles none (a caller's cold start).
_SEGMENT_RE = r"oob-(\d+)-(\d+)-[0-9a-f]+\.seg\Z"
_POOL_RE = r"pool-(\d+)-[0-9a-f]+\.seg\Z"
# Pooled segment header (u64 words): magic, lease, receiver pid; data starts at _SEG_DATA.
_SEG_MAGIC = int.from_bytes(b"KSVPOOL1", "little")
_SEG_DATA = 64
_LEASE = 1
_RECEIVER = 2

_loads = pickle.loads
_dumps_pickle = pickle.dumps
_tuple: type[tuple[Any, ...]] = tuple
_bytes = bytes
_bytearray = bytearray
#: What an empty kwargs / metadata travels as: two plain dicts, never changed, only pickled
#: (two objects, so the receiver does not get one dict for both).
_NO_KWARGS: dict[str, Any] = {}
_NO_METADATA: dict[str, Any] = {}


class DecodeError(ValueError):
    """A record could not be decoded.

    What could still be read travels with it, so the receiver can answer:

    ``request_id``, ``response_queue``, ``service_name``, ``method_name``
        of an undecodable *request* (None when unreadable; answer it only when
        both the id and the reply address were read);
    ``request_ids``
        the requests whose *responses* in the record could not be decoded;
    ``messages``
        the messages of a batch response record that did decode (deliver them).
    """

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.response_queue: str | None = None
        self.service_name: str | None = None
        self.method_name: str | None = None
        self.request_ids: list[str] = []
        self.messages: list[tuple[Any, ...]] = []
        #: The message (or batch) as the lenient unpickler rebuilt it, None when even that failed;
        #: ``exact`` says whether it holds the real objects wherever they could be rebuilt.
        self.envelope: Any = None
        self.exact = False


class _Placeholder:
    """What the lenient unpickler builds for an object it cannot rebuild (see the module docstring).

    It accepts whatever the pickle does to it, and refuses to be pickled again,
    which is how :func:`_holds_placeholder` finds it inside a decoded value.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise _PlaceholderFound


class _PlaceholderFound(Exception):
    pass


class _LenientUnpickler(pickle.Unpickler):
    """Rebuilds what it can; every class or function it cannot (or, with ``exact`` off, need not) import is a placeholder."""

    exact = True

    def find_class(self, module: str, name: str) -> Any:
        if self.exact:
            try:
                return super().find_class(module, name)
            except BaseException:  # noqa: BLE001 - anything unimportable becomes a placeholder
                pass
        return _Placeholder


def _lenient_loads(data: Any, buffers: list[Any] | None = None) -> tuple[Any, bool]:
    """(message, exact) rebuilt leniently from a pickle the strict decoding refused; (None, False) if even that fails.

    ``exact``: the real objects were rebuilt wherever they could be, placeholders
    stand only where they could not; otherwise everything but the plain
    containers and strings is a placeholder (the envelope fields are still right).
    """
    for exact in (True, False):
        unpickler = _LenientUnpickler(io.BytesIO(data), buffers=buffers)
        unpickler.exact = exact
        try:
            return unpickler.load(), exact
        except BaseException:  # noqa: BLE001 - reconstruction raised (anything): try again without real classes
            continue
    return None, False


def _holds_placeholder(value: Any) -> bool:
    """Whether a leniently decoded value holds a placeholder anywhere (it is pickled again to look)."""
    try:
        _dumps_pickle(value, _PROTOCOL, buffer_callback=_keep_out_of_band)
    except _PlaceholderFound:
        return True
    except BaseException:  # noqa: BLE001 - not picklable here for another reason: its data arrived whole
        return False
    return False


def holds_placeholder(value: Any) -> bool:
    """Whether part of a leniently decoded value (a DecodeError's ``envelope``) could not be rebuilt."""
    return _holds_placeholder(value)


def _keep_out_of_band(buffer: pickle.PickleBuffer) -> bool:
    return False  # never copied: only walked


def _undecodable(what: str, exc: BaseException, data: Any, buffers: list[Any] | None = None) -> DecodeError:
    error = DecodeError(f"{what}: {type(exc).__name__}: {exc}")
    error.envelope, error.exact = _lenient_loads(data, buffers)
    return error


class _BigBytes:
    """Pickles a large bytes/bytearray as a protocol-5 buffer, so it can leave the pickle.

    The pickler never offers plain ``bytes`` to ``buffer_callback`` (nor to
    ``reducer_override``), hence this wrapper around top-level values. Its
    buffer is rebuilt by ``bytes(...)``/``bytearray(...)``, a copy: the
    receiver may hand it a view of a pooled segment.
    """

    __slots__ = ("buffer", "data")

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.buffer = pickle.PickleBuffer(data)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (type(self.data), (self.buffer,))


def _wrap_args(args: tuple[Any, ...], threshold: int) -> tuple[Any, ...]:
    for a in args:
        t = type(a)
        if (t is _bytes or t is _bytearray) and len(a) >= threshold:
            return _tuple(_BigBytes(a) if type(a) in (_bytes, _bytearray) and len(a) >= threshold else a for a in args)
    return args


def _wrap_kwargs(kwargs: dict[str, Any], threshold: int) -> dict[str, Any]:
    for v in kwargs.values():
        t = type(v)
        if (t is _bytes or t is _bytearray) and len(v) >= threshold:
            return {
                k: _BigBytes(v) if type(v) in (_bytes, _bytearray) and len(v) >= threshold else v
                for k, v in kwargs.items()
            }
    return kwargs


def _wrap_result(result: Any, threshold: int) -> Any:
    t = type(result)
    if t is _bytes or t is _bytearray:
        return _BigBytes(result) if len(result) >= threshold else result
    if t is tuple or t is list:
        for v in result:
            if type(v) in (_bytes, _bytearray) and len(v) >= threshold:
                return t(_BigBytes(v) if type(v) in (_bytes, _bytearray) and len(v) >= threshold else v for v in result)
    return result


def _trusted(*values: Any) -> set[int]:
    """Ids of the PickleBuffers of our own wrappers among ``values`` (one level deep)."""
    out = set()
    for value in values:
        if type(value) is _BigBytes:
            out.add(id(value.buffer))
        elif type(value) in (tuple, list):
            out.update(id(v.buffer) for v in value if type(v) is _BigBytes)
        elif type(value) is dict:
            out.update(id(v.buffer) for v in value.values() if type(v) is _BigBytes)
    return out


# --------------------------------------------------------------------------- encoding


class _TooBig(Exception):
    pass


def _refuse_buffer(buffer: pickle.PickleBuffer) -> bool:
    raise _TooBig


def _dumps(
    message: tuple[Any, ...], receiver_pid: int, inline_limit: int, threshold: int, trusted: set[int] | None = None
) -> tuple[bytes, str | None]:
    """Pickle ``message``; returns (record, segment token or None). Raises what pickling raises."""
    buffers: list[pickle.PickleBuffer] = []

    def keep_in_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            if buffer.raw().nbytes < threshold:
                return True
        except BufferError:  # not contiguous: must stay in band
            return True
        buffers.append(buffer)
        return False

    data = _dumps_pickle(message, _PROTOCOL, buffer_callback=keep_in_band)
    if not buffers and len(data) <= inline_limit:
        return data, None
    return _out_of_band(data, buffers, receiver_pid, inline_limit, trusted or set())


def _dumps_fast(
    message: tuple[Any, ...], receiver_pid: int, inline_limit: int, threshold: int
) -> tuple[bytes, str | None]:
    """:func:`_dumps` for a message with no wrapped buffer: the common small call, pickled once.

    Pickling stops at the first out-of-band candidate (a numpy array...) and
    the message takes the general path, so nothing large is pickled twice.
    """
    try:
        data = _dumps_pickle(message, _PROTOCOL, buffer_callback=_refuse_buffer)
    except _TooBig:
        return _dumps(message, receiver_pid, inline_limit, threshold)
    if len(data) <= inline_limit:
        return data, None
    return _dumps(message, receiver_pid, inline_limit, threshold)


def _out_of_band(
    data: bytes, buffers: list[pickle.PickleBuffer], receiver_pid: int, inline_limit: int, trusted: set[int]
) -> tuple[bytes, str]:
    views = [b.raw() for b in buffers]
    main_in_segment = len(data) > inline_limit
    parts = ([memoryview(data)] if main_in_segment else []) + views
    total = sum((v.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN for v in parts)
    lease = _pool.write(parts, total, receiver_pid)
    if lease is not None:
        segment, seq = lease
        name = segment.name
        token = f"{name}@{seq}"
        head = [_POOL_HEAD.pack(_POOL_TAG, main_in_segment, len(views), len(data), seq)]
        # Our own bytes wrappers are copied by the unpickler itself; anything else gets a private copy.
        head.extend(
            _LEN.pack(v.nbytes | (0 if id(b) in trusted else _COPY_BIT)) for b, v in zip(buffers, views, strict=False)
        )
    else:
        name = token = _write_segment(parts, receiver_pid)
        head = [_OOB_HEAD.pack(_OOB_TAG, main_in_segment, len(views), len(data))]
        head.extend(_LEN.pack(v.nbytes) for v in views)
    encoded_name = name.encode()
    head.append(_NAME_LEN.pack(len(encoded_name)))
    head.append(encoded_name)
    if not main_in_segment:
        head.append(data)
    return b"".join(head), token


def _write_segment(views: list[memoryview], receiver_pid: int) -> str:
    name = f"oob-{os.getpid()}-{receiver_pid}-{os.urandom(8).hex()}.seg"
    directory = queue_directory()
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # The reader maps whole aligned slots: reserve them all, so no page of the mapping is a hole.
        reserve(fd, sum((v.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN for v in views), directory, "an out-of-band segment")
        offset = 0
        for view in views:
            length = view.nbytes
            written = 0
            while written < length:
                written += os.pwrite(fd, view[written:], offset + written)
            offset += (length + _ALIGN - 1) // _ALIGN * _ALIGN
    except BaseException:
        os.close(fd)
        unlink_segment(name)
        raise
    os.close(fd)
    return name


def encode_request(
    request: ServiceRequest,
    response_queue: str,
    receiver_pid: int,
    inline_limit: int,
    threshold: int = OUT_OF_BAND_THRESHOLD,
) -> tuple[bytes, str | None]:
    """The record carrying ``request``; raises what pickling raises (nothing is left behind then)."""
    args = request.args
    kwargs = request.kwargs
    metadata = request.metadata
    # The wire carries plain dicts (the receiver checks): a caller or a middleware may have set
    # a dict subclass.
    if type(kwargs) is not dict:
        kwargs = dict(kwargs) if kwargs else _NO_KWARGS
    if type(metadata) is not dict:
        metadata = dict(metadata) if metadata else _NO_METADATA
    message = (
        KIND_CALL,
        request.request_id,
        request.service_name,
        request.method_name,
        args,
        kwargs,
        response_queue,
        request.deadline,
        metadata,
    )
    # The common call checked inline (every call pays for this path): no keyword arguments and
    # no large bytes to wrap.
    for value in args:
        if (type(value) is _bytes or type(value) is _bytearray) and len(value) >= threshold:
            break
    else:
        if not kwargs:
            return _dumps_fast(message, receiver_pid, inline_limit, threshold)
    wrapped_args = _wrap_args(args, threshold)
    wrapped_kwargs = _wrap_kwargs(kwargs, threshold) if kwargs else kwargs
    if wrapped_args is args and wrapped_kwargs is kwargs:
        return _dumps_fast(message, receiver_pid, inline_limit, threshold)
    message = (*message[:4], wrapped_args, wrapped_kwargs, *message[6:])
    return _dumps(message, receiver_pid, inline_limit, threshold, _trusted(wrapped_args, wrapped_kwargs))


def encode_request_batch(requests: Sequence[ServiceRequest], response_queue: str, inline_limit: int) -> bytes | None:
    """One inline record carrying several call requests (a list of request messages).

    None when they do not fit one inline record (a buffer that would travel out
    of band, or more than ``inline_limit`` bytes): send them one by one then.
    Raises what pickling raises (an argument that cannot be pickled: send them
    one by one, so only that call fails).
    """
    messages: list[tuple[Any, ...]] = []
    append = messages.append
    for request in requests:
        kwargs = request.kwargs
        metadata = request.metadata
        if type(kwargs) is not dict:
            kwargs = dict(kwargs) if kwargs else _NO_KWARGS
        if type(metadata) is not dict:
            metadata = dict(metadata) if metadata else _NO_METADATA
        append(
            (
                KIND_CALL,
                request.request_id,
                request.service_name,
                request.method_name,
                request.args,
                kwargs,
                response_queue,
                request.deadline,
                metadata,
            )
        )
    try:
        data = _dumps_pickle(messages, _PROTOCOL, buffer_callback=_refuse_buffer)
    except _TooBig:
        return None
    return data if len(data) <= inline_limit else None


def decode_request_batch(messages: list[Any]) -> list[ServiceRequest]:
    """The requests of a decoded request batch (what :func:`decode_request` returns with KIND_BATCH).

    DecodeError when a message is not a call request; it carries that
    message's envelope, and the requests decoded before it in ``requests``.
    """
    requests: list[ServiceRequest] = []
    for message in messages:
        if type(message) is not tuple or len(message) != 9 or message[0] != KIND_CALL:
            error = DecodeError("a request batch record holds something that is not a call request")
            error.requests = requests  # type: ignore[attr-defined]
            _set_envelope(error, message)
            raise error
        try:
            requests.append(request_from_message(message))
        except DecodeError as error:
            error.requests = requests  # type: ignore[attr-defined]
            raise
    return requests


def batch_envelope_calls(error: DecodeError) -> list[tuple[ServiceRequest | None, DecodeError | None]]:
    """For an undecodable request batch: each call as a request to run, or as the DecodeError to answer it with.

    A call whose arguments were all rebuilt exactly runs; one holding an object
    the host cannot rebuild is answered with its own DecodeError. When even the
    lenient decoding could not rebuild real objects, every call gets the error.
    """
    calls: list[tuple[ServiceRequest | None, DecodeError | None]] = []
    for message in error.envelope if type(error.envelope) is list else ():
        if type(message) is not tuple or len(message) != 9:
            continue
        if error.exact and not _holds_placeholder(message):
            try:
                calls.append((request_from_message(message), None))
                continue
            except DecodeError as exc:
                calls.append((None, exc))
                continue
        own = DecodeError(str(error))
        _set_envelope(own, message)
        calls.append((None, own))
    return calls


# --------------------------------------------------------------------------- chunks


def encode_chunk(
    chunk_id: str,
    service_name: str,
    method_name: str,
    args: tuple[tuple[Any, ...], ...],
    kwargs: dict[str, Any],
    response_queue: str,
    deadline: float | None,
    metadata: dict[str, Any],
    inline_limit: int,
    kind: int = KIND_CHUNK,
) -> bytes | None:
    """One inline record carrying a *chunk*: many calls of one method, without a request per call.

    The layout is a request tuple whose kind is :data:`KIND_CHUNK`, whose id is
    the chunk's and whose ``args`` is a tuple of per-call argument tuples
    (``kwargs``, ``metadata`` and the deadline are shared by every call), so
    :func:`decode_request` checks it like any request. None when it does not
    fit one inline record (a buffer that would travel out of band, or more
    than ``inline_limit`` bytes): send the calls the per-call way then. Raises
    what pickling raises. With ``kind`` :data:`KIND_CHUNK_SINGLE`, ``args``
    holds each call's one positional argument instead of its argument tuple.
    """
    if type(kwargs) is not dict:
        kwargs = dict(kwargs) if kwargs else _NO_KWARGS
    if type(metadata) is not dict:
        metadata = dict(metadata) if metadata else _NO_METADATA
    message = (kind, chunk_id, service_name, method_name, args, kwargs, response_queue, deadline, metadata)
    try:
        data = _dumps_pickle(message, _PROTOCOL, buffer_callback=_refuse_buffer)
    except _TooBig:
        return None
    return data if len(data) <= inline_limit else None


def encode_chunk_answer(
    chunk_id: str,
    results: list[Any],
    errors: dict[int, tuple[Any, ...]] | None,
    receiver_pid: int,
    inline_limit: int,
) -> tuple[bytes, str | None]:
    """The one record answering a chunk: ``(chunk_id, results, errors)``.

    ``results`` holds every call's result in item order (None for a failed
    call); ``errors`` maps the index of each failed call to ``(error,
    error_type, error_origin, remote_traceback, metadata)``, as a response
    carries them, or is None when none failed. Large results travel out of
    band like any response's. Raises what pickling raises.
    """
    return _dumps_fast((chunk_id, results, errors or None), receiver_pid, inline_limit, OUT_OF_BAND_THRESHOLD)


def encode_status_request(request_id: str, service_name: str, response_queue: str, deadline: float) -> bytes:
    """A record asking the listener for its task's status (never reaches the service)."""
    return pickle.dumps((KIND_STATUS, request_id, service_name, "", (), {}, response_queue, deadline, {}), _PROTOCOL)


def request_id_marker(request_id: str) -> bytes:
    """Bytes every request record of ``request_id`` written inline contains (see :func:`encode_request`).

    The id as pickled, with its length prefix, so one id never matches a
    longer one. Records carried in a segment do not contain it.
    """
    data = request_id.encode("utf-8", "surrogatepass")
    if len(data) < 256:
        return b"\x8c" + bytes((len(data),)) + data  # SHORT_BINUNICODE
    return b"X" + len(data).to_bytes(4, "little") + data  # BINUNICODE


def encode_cancel_request(request_id: str, service_name: str) -> bytes:
    """A record telling a listener its caller gave up on ``request_id`` (no response is sent for it)."""
    return pickle.dumps((KIND_CANCEL, request_id, service_name, "", (), {}, "", None, {}), _PROTOCOL)


def _is_plain(response: ServiceResponse, threshold: int) -> bool:
    """Whether ``response`` is a success that travels as (request id, result), with nothing to wrap.

    A hot-path tuning: the common reply skips building the full response tuple,
    ~0.2 µs of a ~0.9 µs encode (the "plain reply" row of
    tests/benchmarks/bench_tunings.py).
    """
    result = response.result
    t = type(result)
    return (
        response.success
        and not response.metadata
        and not response.degraded
        and ((t is not _bytes and t is not _bytearray) or len(result) < threshold)
        and t is not tuple
        and t is not list
    )


def response_message(response: ServiceResponse, threshold: int = OUT_OF_BAND_THRESHOLD) -> tuple[Any, ...]:
    """The tuple that carries ``response`` (compact for a plain success)."""
    if response.success:
        result = response.result
        t = type(result)
        if t is tuple or t is list or t is _bytes or t is _bytearray:
            result = _wrap_result(result, threshold)
        if not response.metadata and not response.degraded:
            return (response.request_id, result)
    else:
        result = None
    return (
        response.request_id,
        response.success,
        result,
        response.error,
        response.error_type,
        response.error_origin,
        response.remote_traceback,
        response.metadata,
        response.degraded,
    )


def encode_response(
    response: ServiceResponse,
    receiver_pid: int,
    inline_limit: int,
    threshold: int = OUT_OF_BAND_THRESHOLD,
) -> tuple[bytes, str | None]:
    """The record carrying ``response``; raises what pickling raises."""
    if _is_plain(response, threshold):  # the common reply
        return _dumps_fast((response.request_id, response.result), receiver_pid, inline_limit, threshold)
    message = response_message(response, threshold)
    result = message[1] if len(message) == 2 else message[2]
    trusted = _trusted(result) if type(result) in (_BigBytes, tuple, list) else None
    if trusted:
        return _dumps(message, receiver_pid, inline_limit, threshold, trusted)
    return _dumps_fast(message, receiver_pid, inline_limit, threshold)


def encode_response_batch(responses: list[ServiceResponse], inline_limit: int) -> bytes | None:
    """One inline record carrying several responses.

    None when they do not fit one inline record (a buffer that travels out of
    band, or more than ``inline_limit`` bytes): send them one by one then.
    Raises what pickling raises.
    """
    messages = [
        (r.request_id, r.result) if _is_plain(r, OUT_OF_BAND_THRESHOLD) else response_message(r) for r in responses
    ]
    try:
        data = _dumps_pickle(messages, _PROTOCOL, buffer_callback=_refuse_buffer)
    except _TooBig:
        return None
    return data if len(data) <= inline_limit else None


def request_from_message(message: tuple[Any, ...]) -> ServiceRequest:
    """The ServiceRequest of a decoded request tuple; DecodeError when a field has the wrong type."""
    if len(message) != 9:
        raise DecodeError("a response record arrived on a request queue")
    _, request_id, service_name, method_name, args, kwargs, response_queue, deadline, metadata = message
    if (
        type(request_id) is not str
        or type(method_name) is not str
        or type(args) is not tuple
        or type(kwargs) is not dict
        or type(response_queue) is not str
        or (deadline is not None and type(deadline) is not float)
        or type(metadata) is not dict
        or type(service_name) is not str
    ):
        wrong = [
            f"{field} is a {type(value).__name__}"
            for field, value, ok in (
                ("the request id", request_id, type(request_id) is str),
                ("the service name", service_name, type(service_name) is str),
                ("the method name", method_name, type(method_name) is str),
                ("args", args, type(args) is tuple),
                ("kwargs", kwargs, type(kwargs) is dict),
                ("the reply address", response_queue, type(response_queue) is str),
                ("the deadline", deadline, deadline is None or type(deadline) is float),
                ("metadata", metadata, type(metadata) is dict),
            )
            if not ok
        ]
        error = DecodeError(f"request record has fields of the wrong types: {', '.join(wrong)}")
        _set_envelope(error, message)
        raise error
    return ServiceRequest(request_id, service_name, method_name, args, kwargs, response_queue, deadline, metadata)


def _set_envelope(error: DecodeError, message: Any) -> None:
    """Copy the readable envelope fields of a request tuple onto ``error``."""
    if type(message) is not tuple or len(message) != 9:
        return
    _, request_id, service_name, method_name, _, _, response_queue, _, _ = message
    if type(request_id) is str:
        error.request_id = request_id
    if type(response_queue) is str:
        error.response_queue = response_queue
    if type(service_name) is str:
        error.service_name = service_name
    if type(method_name) is str:
        error.method_name = method_name


def decode_request(record: bytes) -> tuple[int, ServiceRequest]:
    """(kind, request) of a request record; DecodeError otherwise.

    The DecodeError carries the request id and reply address whenever they
    could be read (an argument whose class the host cannot import leaves them
    readable), so the host can answer the caller.
    """
    try:
        message = _load(record)
    except DecodeError as exc:
        _set_envelope(exc, exc.envelope)
        raise
    if type(message) is list:
        return KIND_BATCH, message  # type: ignore[return-value]  # decode each with decode_request_batch
    if type(message) is not tuple or len(message) != 9 or type(message[0]) is not int:
        what = "a response" if type(message) in (tuple, list) else f"a {type(message).__name__}"
        raise DecodeError(f"{what} record arrived on a request queue")
    return message[0], request_from_message(message)


def response_from_message(
    message: tuple[Any, ...], _response: type[ServiceResponse] = ServiceResponse
) -> ServiceResponse:
    """The ServiceResponse of a decoded response tuple."""
    if len(message) == 2:
        return _response(True, message[1], None, message[0])
    request_id, success, result, error, error_type, error_origin, remote_traceback, metadata, degraded = message
    return _response(success, result, error, request_id, error_type, error_origin, remote_traceback, metadata, degraded)


# --------------------------------------------------------------------------- pooled segments


class _PoolSegment:
    __slots__ = ("busy_since", "capacity", "mm", "name", "path", "words")

    def __init__(self, capacity: int) -> None:
        self.name = f"pool-{os.getpid()}-{os.urandom(8).hex()}.seg"
        directory = queue_directory()
        self.path = os.path.join(directory, self.name)
        self.capacity = capacity
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # Allocated now: written through the mapping, a sparse file on a full tmpfs means SIGBUS.
            reserve(fd, _SEG_DATA + capacity, directory, "a pooled segment")
            self.mm = mmap.mmap(fd, _SEG_DATA + capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        os.close(fd)
        self.words = memoryview(self.mm)[:_SEG_DATA].cast("Q")
        self.words[0] = _SEG_MAGIC
        self.busy_since = 0.0

    def drop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.words.release()
        with contextlib.suppress(BufferError):
            self.mm.close()


class _SegmentPool:
    """This process's pooled segments (sender side) and mappings of other processes' (receiver side)."""

    #: Other processes' pooled segments kept mapped here.
    MAPPED = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: list[_PoolSegment] = []
        self._seq = itertools.count(1)
        self._mapped: collections.OrderedDict[str, tuple[mmap.mmap, memoryview]] = collections.OrderedDict()
        self._pid = os.getpid()

    # -- sender side

    def write(self, parts: list[memoryview], total: int, receiver_pid: int) -> tuple[_PoolSegment, int] | None:
        """Copy ``parts`` (aligned) into a free pooled segment and lease it; None when the pool cannot."""
        if total > POOL_MAX_SEGMENT or total == 0:
            return None
        with self._lock:
            segment = self._free(total)
            if segment is None:
                return None
            seq = next(self._seq)
            segment.words[_RECEIVER] = receiver_pid
            segment.words[_LEASE] = seq
            segment.busy_since = time.monotonic()
        try:
            mm = segment.mm
            offset = _SEG_DATA
            for view in parts:
                n = view.nbytes
                mm[offset : offset + n] = view.cast("B") if view.format != "B" or view.ndim != 1 else view
                offset += (n + _ALIGN - 1) // _ALIGN * _ALIGN
        except BaseException:
            segment.words[_LEASE] = 0
            raise
        return segment, seq

    def _free(self, total: int) -> _PoolSegment | None:
        best = None
        for segment in self._segments:
            if segment.capacity >= total and not segment.words[_LEASE]:
                if best is None or segment.capacity < best.capacity:
                    best = segment
        if best is not None:
            return best
        self._reclaim_leases()
        for segment in self._segments:
            if segment.capacity >= total and not segment.words[_LEASE]:
                if best is None or segment.capacity < best.capacity:
                    best = segment
        if best is not None:
            return best
        if len(self._segments) >= POOL_SEGMENTS:
            idle = [s for s in self._segments if not s.words[_LEASE]]
            if not idle:
                return None
            victim = min(idle, key=lambda s: s.capacity)
            self._segments.remove(victim)
            victim.drop()
        capacity = POOL_MIN_SEGMENT
        while capacity < total:
            capacity <<= 1
        try:
            segment = _PoolSegment(min(capacity, POOL_MAX_SEGMENT))
        except OSError:
            return None  # no room in the tmpfs: the one-shot path reports it
        self._segments.append(segment)
        return segment

    def _reclaim_leases(self) -> None:
        """Free leases whose receiver died; drop segments whose lease looks lost."""
        now = time.monotonic()
        for segment in list(self._segments):
            if not segment.words[_LEASE]:
                continue
            if not _pid_alive(segment.words[_RECEIVER]):
                segment.words[_LEASE] = 0
            elif now - segment.busy_since > POOL_LEASE_LOST:
                self._segments.remove(segment)
                segment.drop()

    def release_lease(self, name: str, seq: int) -> None:
        """The sender takes back a lease whose record was never queued."""
        with self._lock:
            for segment in self._segments:
                if segment.name == name:
                    if segment.words[_LEASE] == seq:
                        segment.words[_LEASE] = 0
                    return

    def clear(self, wait: float = 1.0) -> None:
        """Unlink this process's pooled segments and unmap the others'.

        Waits up to ``wait`` seconds for leased segments to be read by their
        (live) receivers first, so a response sent just before a host stops
        still arrives.
        """
        if os.getpid() != self._pid:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            with self._lock:
                leased = [s for s in self._segments if s.words[_LEASE] and _pid_alive(s.words[_RECEIVER])]
            if not leased:
                break
            time.sleep(0.005)
        with self._lock:
            segments, self._segments = self._segments, []
            mapped, self._mapped = self._mapped, collections.OrderedDict()
        for segment in segments:
            segment.drop()
        for mm, words in mapped.values():
            words.release()
            with contextlib.suppress(BufferError):
                mm.close()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's segments are the parent's."""
        self._lock = threading.Lock()
        self._segments = []
        self._mapped = collections.OrderedDict()
        self._pid = os.getpid()

    # -- receiver side

    def mapping(self, name: str, size: int) -> tuple[mmap.mmap, memoryview]:
        """The (cached) shared mapping of another process's pooled segment."""
        with self._lock:
            entry = self._mapped.get(name)
            if entry is not None and len(entry[0]) >= _SEG_DATA + size:
                self._mapped.move_to_end(name)
                return entry
        entry = _map_pooled(name, size)
        with self._lock:
            self._mapped[name] = entry
            while len(self._mapped) > self.MAPPED:
                _, (old_mm, old_words) = self._mapped.popitem(last=False)
                old_words.release()
                with contextlib.suppress(BufferError):
                    old_mm.close()
        return entry

    def mapped_count(self) -> int:
        """How many of other processes' pooled segments are mapped here."""
        return len(self._mapped)

    def unmap_gone(self) -> int:
        """Forget the mappings of pooled segments whose sender ended or removed them; returns how many.

        Why: a removed segment's memory lives as long as a process maps it, so a
        host would keep up to :attr:`MAPPED` segments of every caller that ended.
        The mappings are dropped, not closed: a worker thread may be reading a
        record through one (a record its sender queued just before it ended),
        and the mapping is unmapped as soon as the last such reference goes.
        """
        with self._lock:
            names = list(self._mapped)
        directory = queue_directory(sweep=False)
        gone = []
        for name in names:
            match = re.match(_POOL_RE, name)
            sender = int(match.group(1)) if match is not None else 0
            if not _pid_alive(sender) or not os.path.exists(os.path.join(directory, name)):
                gone.append(name)
        if gone:
            with self._lock:
                for name in gone:
                    self._mapped.pop(name, None)
        return len(gone)


def _open_owned(name: str, what: str, mode: int, gone: str) -> int:
    """A descriptor of segment ``name`` if it is a regular file of ours that nobody else can read or write.

    Raises DecodeError otherwise: a segment that is not ours to trust is never
    unpickled from, and is left to its owner.
    """
    try:
        fd = os.open(os.path.join(queue_directory(), name), mode | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DecodeError(f"{what} {name} is gone ({gone})") from None
    st = os.fstat(fd)
    if not is_private_file(st):
        os.close(fd)
        raise DecodeError(
            f"{what} {name} belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}; refusing to read it"
        )
    return fd


def _map_pooled(name: str, size: int) -> tuple[mmap.mmap, memoryview]:
    fd = _open_owned(name, "pooled segment", os.O_RDWR, "its sender exited or the janitor removed it")
    try:
        st = os.fstat(fd)
        if st.st_size < _SEG_DATA + size:
            raise DecodeError(f"pooled segment {name} holds {st.st_size} bytes, the record needs {_SEG_DATA + size}")
        mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    words = memoryview(mm)[:_SEG_DATA].cast("Q")
    if words[0] != _SEG_MAGIC:
        words.release()
        mm.close()
        raise DecodeError(f"{name} is not a pooled segment")
    return mm, words


_pool = _SegmentPool()
atexit.register(_pool.clear)
os.register_at_fork(after_in_child=_pool.forget_after_fork)


def mapped_segments() -> int:
    """How many of other processes' pooled segments this process keeps mapped (at most ``_SegmentPool.MAPPED``)."""
    return _pool.mapped_count()


def unmap_gone_senders() -> int:
    """Unmap the pooled segments of senders that ended or removed them; returns how many (never raises).

    A receiver keeps the pooled segments it read from mapped for reuse; this lets
    go of those nobody can write to again, so their memory is freed.
    """
    try:
        return _pool.unmap_gone()
    except OSError:
        return 0


def release_pool(wait: float = 1.0) -> None:
    """Unlink this process's pooled segments now (they are recreated on demand).

    Waits up to ``wait`` seconds for records still being read by live receivers.
    """
    _pool.clear(wait)


# --------------------------------------------------------------------------- decoding


def _parse_oob_header(record: bytes) -> tuple[bool, list[int], int, str, int, int]:
    """(main in segment, buffer lengths, main length, segment name, offset of the inline pickle, lease)."""
    try:
        pooled = record[0] == _POOL_TAG
        if pooled:
            _, main_in_segment, count, main_len, seq = _POOL_HEAD.unpack_from(record, 0)
            pos = _POOL_HEAD.size
        else:
            _, main_in_segment, count, main_len = _OOB_HEAD.unpack_from(record, 0)
            pos = _OOB_HEAD.size
            seq = 0
        if count > (len(record) - pos) // _LEN.size:
            raise DecodeError(f"out-of-band record claims {count} buffers in {len(record)} bytes")
        lengths = [_LEN.unpack_from(record, pos + i * _LEN.size)[0] for i in range(count)]
        pos += count * _LEN.size
        (name_len,) = _NAME_LEN.unpack_from(record, pos)
        pos += _NAME_LEN.size
        name = bytes(record[pos : pos + name_len]).decode()
    except (struct.error, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed out-of-band record header: {exc}") from None
    if not re.match(_POOL_RE if pooled else _SEGMENT_RE, name):
        raise DecodeError(f"out-of-band record names an invalid segment {name!r}")
    return bool(main_in_segment), lengths, main_len, name, pos + name_len, seq


def _open_segment(name: str, size: int) -> mmap.mmap | None:
    """Open, check, unlink and map a segment (copy-on-write). None for an empty one."""
    fd = _open_owned(name, "out-of-band segment", os.O_RDONLY, "its sender or the janitor removed it")
    try:
        st = os.fstat(fd)
        unlink_segment(name)
        if st.st_size < size:
            raise DecodeError(f"out-of-band segment {name} holds {st.st_size} bytes, the record needs {size}")
        if size == 0:
            return None
        # Copy-on-write: arrays built on it are writable without touching the file. No
        # MAP_POPULATE: on a writable private mapping it would copy every page up front.
        return mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _decode_pooled(record: bytes) -> Any:
    main_in_segment, lengths, main_len, name, pos, seq = _parse_oob_header(record)
    sizes = ([main_len] if main_in_segment else []) + [n & ~_COPY_BIT for n in lengths]
    total = sum((n + _ALIGN - 1) // _ALIGN * _ALIGN for n in sizes)
    mm, words = _pool.mapping(name, total)
    if words[_LEASE] != seq:
        raise DecodeError(f"pooled segment {name} does not hold this record (lease {words[_LEASE]}, record {seq})")
    view = memoryview(mm)
    buffers: list[Any] = []
    data: Any = None
    try:
        offset = _SEG_DATA
        if main_in_segment:
            data = view[offset : offset + main_len]
            offset += (main_len + _ALIGN - 1) // _ALIGN * _ALIGN
        else:
            data = memoryview(record)[pos:]
        for n in lengths:
            size = n & ~_COPY_BIT
            part = view[offset : offset + size]
            buffers.append(bytearray(part) if n & _COPY_BIT else part)
            offset += (size + _ALIGN - 1) // _ALIGN * _ALIGN
        return _loads_out_of_band(data, buffers, name)
    finally:
        del data, buffers
        view.release()
        words[_LEASE] = 0  # the data is copied out: the sender may reuse the segment


def _loads_out_of_band(data: Any, buffers: list[Any], name: str) -> Any:
    try:
        return _loads(data, buffers=buffers)
    except BaseException as exc:  # noqa: BLE001 - the data's own code may raise anything, SystemExit too
        raise _undecodable(f"undecodable out-of-band record ({name})", exc, data, buffers) from None


def _decode_one_shot(record: bytes) -> Any:
    main_in_segment, lengths, main_len, name, pos, _ = _parse_oob_header(record)
    aligned = [(n + _ALIGN - 1) // _ALIGN * _ALIGN for n in ([main_len] if main_in_segment else []) + lengths]
    mapped = _open_segment(name, sum(aligned))
    view = memoryview(mapped) if mapped is not None else memoryview(b"")
    offset = 0
    if main_in_segment:
        data: Any = view[:main_len]
        offset = aligned[0]
    else:
        data = memoryview(record)[pos:]
    buffers = []
    for n in lengths:
        buffers.append(view[offset : offset + n])
        offset += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    try:
        return _loads_out_of_band(data, buffers, name)
    finally:
        del data, view


def _load(record: bytes) -> Any:
    tag = record[:1]
    if tag == b"\x80":
        try:
            return _loads(record)
        except BaseException as exc:  # noqa: BLE001 - the data's own code may raise anything, SystemExit too
            raise _undecodable(f"undecodable record of {len(record)} bytes", exc, record) from None
    if tag == b"P":
        return _decode_pooled(record)
    if tag == b"O":
        return _decode_one_shot(record)
    raise DecodeError(f"unknown record type {tag!r} ({len(record)} bytes)")


def _check(message: Any) -> tuple[Any, ...]:
    if type(message) is not tuple or (len(message) != 9 and len(message) != 2 and len(message) != 3):
        raise DecodeError(f"record decoded to {type(message).__name__}, not a kservice message")
    return message


def decode(record: bytes) -> tuple[Any, ...]:
    """The message tuple of one record; raises DecodeError (its segment, if any, is released)."""
    message = _load(record)
    if type(message) is tuple and len(message) == 9:
        return message
    return _check(message)


def decode_many(record: bytes) -> list[tuple[Any, ...]]:
    """The message tuples of one response record (a batch record holds several); raises DecodeError.

    The DecodeError of a record whose results could not all be decoded names
    their request ids (``request_ids``) and carries the batch's other messages
    (``messages``), so each caller gets its own answer.
    """
    try:
        message = _load(record)
    except DecodeError as exc:
        _attribute_responses(exc)
        raise
    if type(message) is list:
        for m in message:
            _check(m)
        return message
    return [_check(message)]


def _attribute_responses(error: DecodeError) -> None:
    """Fill in ``request_ids`` and ``messages`` of a response record's DecodeError from its envelope."""
    envelope = error.envelope
    batch = envelope if type(envelope) is list else [envelope]
    for message in batch:
        if type(message) is not tuple or len(message) not in (2, 9) or type(message[0]) is not str:
            continue
        if error.exact and type(envelope) is list and not _holds_placeholder(message):
            error.messages.append(message)
        else:
            error.request_ids.append(message[0])


def discard(record: bytes) -> None:
    """Drop a record without decoding it, releasing its out-of-band segment (never raises)."""
    tag = record[:1]
    if tag == b"O":
        with contextlib.suppress(Exception):
            unlink_segment(_parse_oob_header(record)[3])
    elif tag == b"P":
        with contextlib.suppress(Exception):
            _, _lengths, _main_len, name, _, seq = _parse_oob_header(record)
            _, words = _pool.mapping(name, 0)
            if words[_LEASE] == seq:
                words[_LEASE] = 0


def unlink_segment(name: str | None) -> None:
    """Give up the segment of a record that was never queued (a one-shot one is removed); never fails."""
    if not name:
        return
    if "@" in name:
        base, _, seq = name.partition("@")
        _pool.release_lease(base, int(seq))
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(queue_directory(), name))


# --------------------------------------------------------------------------- janitor


def reclaim_segments(pid_alive: Callable[[int], bool], older_than: float = ORPHAN_SEGMENT_GRACE) -> list[str]:
    """Remove segments no live process will read; returns their names.

    A one-shot segment is removed when its receiver is gone, or when its sender
    is gone and it is older than ``older_than`` seconds (its record was lost).
    A pooled segment is removed when its owner (sender) is gone.
    """
    removed = []
    now = time.time()
    directory = queue_directory(sweep=False)  # the first-use sweep would run this and take its result
    for entry in entries_of(directory):
        if not entry.name.startswith(("oob-", "pool-")):
            continue  # a ring (most entries): no pattern to compile and match
        match = re.match(_SEGMENT_RE, entry.name)
        if match is None:
            pooled = re.match(_POOL_RE, entry.name)
            if pooled is not None and not pid_alive(int(pooled.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            continue
        sender, receiver = int(match.group(1)), int(match.group(2))
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if not pid_alive(receiver) or (not pid_alive(sender) and age > older_than):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed
