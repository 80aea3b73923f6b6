"""How requests and responses travel through the shared-memory rings.

A message is a plain tuple pickled with protocol 5 (tuples are cheaper to
pickle than the dataclasses, and the layout is private to this module).
A record in a ring is one of:

``\\x80...`` (an inline record)
    The pickle itself (every protocol-5 pickle starts with ``\\x80``).

``O`` + header (an out-of-band record)
    Large buffers (``bytes``/``bytearray`` arguments, keyword values and
    results of at least :data:`OUT_OF_BAND_THRESHOLD` bytes, and any
    protocol-5 ``PickleBuffer`` such as a contiguous numpy array) are written to
    a separate shared-memory *segment* and only their lengths travel in the
    ring; a pickle too large for the ring travels in the segment too. The
    segment is a file ``oob-<sender pid>-<receiver pid>-<token>.seg`` in the
    per-user queue directory, created 0600. The receiver opens it, checks that
    it belongs to this user and is private, unlinks it at once and maps it
    copy-on-write: a numpy array arrives without a copy, ``bytes`` with one.

Guarantees: a segment is unlinked exactly once by whoever sees it last: the
receiver when it reads (or discards) the record, the sender when the record
could not be queued, the janitor (:func:`reclaim_segments`) when its receiver
died first. Anything that cannot be decoded raises :class:`DecodeError`, which
carries the request id whenever it could be read, and never leaves a segment
behind.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from kservice import ServiceRequest, ServiceResponse

from .ring import queue_directory

__all__ = [
    "KIND_CALL",
    "KIND_STATUS",
    "OUT_OF_BAND_THRESHOLD",
    "DecodeError",
    "decode",
    "discard",
    "encode_request",
    "encode_response",
    "reclaim_segments",
    "request_from_message",
    "response_from_message",
    "unlink_segment",
]

#: Buffers of at least this many bytes travel out of band.
OUT_OF_BAND_THRESHOLD = 256 * 1024

#: Message kinds (first field of a request tuple).
KIND_CALL = 1
KIND_STATUS = 2

_PROTOCOL = 5
_OOB_TAG = 0x4F  # "O"
_OOB_HEAD = struct.Struct("<BBIQ")  # tag, main-in-segment flag, buffer count, main pickle length
_LEN = struct.Struct("<Q")
_NAME_LEN = struct.Struct("<H")
_ALIGN = 64
_SEGMENT_RE = re.compile(r"oob-(\d+)-(\d+)-[0-9a-f]+\.seg\Z")


class DecodeError(ValueError):
    """A record could not be decoded; ``request_id`` is set when it could be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class _BigBytes:
    """Pickles a large bytes/bytearray as a protocol-5 buffer, so it can leave the pickle.

    The pickler never offers plain ``bytes`` to ``buffer_callback`` (nor to
    ``reducer_override``), hence this wrapper around top-level values.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (type(self.data), (pickle.PickleBuffer(self.data),))


def _is_big(value: Any, threshold: int) -> bool:
    t = type(value)
    return (t is bytes or t is bytearray) and len(value) >= threshold


def _wrap_args(args: tuple[Any, ...], threshold: int) -> tuple[Any, ...]:
    for a in args:
        if _is_big(a, threshold):
            return tuple(_BigBytes(a) if _is_big(a, threshold) else a for a in args)
    return args


def _wrap_kwargs(kwargs: dict[str, Any], threshold: int) -> dict[str, Any]:
    for v in kwargs.values():
        if _is_big(v, threshold):
            return {k: _BigBytes(v) if _is_big(v, threshold) else v for k, v in kwargs.items()}
    return kwargs


def _wrap_result(result: Any, threshold: int) -> Any:
    if _is_big(result, threshold):
        return _BigBytes(result)
    t = type(result)
    if t is tuple or t is list:
        for v in result:
            if _is_big(v, threshold):
                return t(_BigBytes(v) if _is_big(v, threshold) else v for v in result)
    return result


# --------------------------------------------------------------------------- encoding


def _dumps(message: tuple[Any, ...], receiver_pid: int, inline_limit: int, threshold: int) -> tuple[bytes, str | None]:
    """Pickle ``message``; returns (record, segment name or None). Raises what pickling raises."""
    buffers: list[pickle.PickleBuffer] = []

    def keep_in_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            if buffer.raw().nbytes < threshold:
                return True
        except BufferError:  # not contiguous: must stay in band
            return True
        buffers.append(buffer)
        return False

    data = pickle.dumps(message, _PROTOCOL, buffer_callback=keep_in_band)
    if not buffers and len(data) <= inline_limit:
        return data, None
    views = [b.raw() for b in buffers]
    main_in_segment = len(data) > inline_limit
    name = _write_segment(([memoryview(data)] if main_in_segment else []) + views, receiver_pid)
    head = [_OOB_HEAD.pack(_OOB_TAG, main_in_segment, len(views), len(data))]
    head.extend(_LEN.pack(v.nbytes) for v in views)
    encoded_name = name.encode()
    head.append(_NAME_LEN.pack(len(encoded_name)))
    head.append(encoded_name)
    if not main_in_segment:
        head.append(data)
    return b"".join(head), name


def _write_segment(views: list[memoryview], receiver_pid: int) -> str:
    name = f"oob-{os.getpid()}-{receiver_pid}-{secrets.token_hex(8)}.seg"
    path = os.path.join(queue_directory(), name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        for view in views:
            length = view.nbytes
            written = 0
            while written < length:
                written += os.pwrite(fd, view[written:], offset + written)
            offset += (length + _ALIGN - 1) // _ALIGN * _ALIGN
        os.ftruncate(fd, offset)  # the reader maps whole aligned slots
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
    message = (
        KIND_CALL,
        request.request_id,
        request.service_name,
        request.method_name,
        _wrap_args(request.args, threshold),
        _wrap_kwargs(request.kwargs, threshold) if request.kwargs else request.kwargs,
        response_queue,
        request.deadline,
        request.metadata,
    )
    return _dumps(message, receiver_pid, inline_limit, threshold)


def encode_status_request(request_id: str, service_name: str, response_queue: str, deadline: float) -> bytes:
    """A record asking the listener for its task's status (never reaches the service)."""
    return pickle.dumps((KIND_STATUS, request_id, service_name, "", (), {}, response_queue, deadline, {}), _PROTOCOL)


def encode_response(
    response: ServiceResponse,
    receiver_pid: int,
    inline_limit: int,
    threshold: int = OUT_OF_BAND_THRESHOLD,
) -> tuple[bytes, str | None]:
    """The record carrying ``response``; raises what pickling raises."""
    message = (
        response.request_id,
        response.success,
        _wrap_result(response.result, threshold) if response.success else None,
        response.error,
        response.error_type,
        response.error_origin,
        response.remote_traceback,
        response.metadata,
        response.degraded,
    )
    return _dumps(message, receiver_pid, inline_limit, threshold)


def request_from_message(message: tuple[Any, ...]) -> ServiceRequest:
    """The ServiceRequest of a decoded request tuple; DecodeError when a field has the wrong type."""
    _, request_id, service_name, method_name, args, kwargs, response_queue, deadline, metadata = message
    if (
        type(request_id) is not str
        or type(method_name) is not str
        or type(args) is not tuple
        or type(kwargs) is not dict
        or type(response_queue) is not str
        or (deadline is not None and type(deadline) is not float)
        or type(metadata) is not dict
    ):
        raise DecodeError(
            "request record has fields of the wrong types",
            request_id if type(request_id) is str else None,
        )
    return ServiceRequest(request_id, service_name, method_name, args, kwargs, response_queue, deadline, metadata)


def response_from_message(message: tuple[Any, ...]) -> ServiceResponse:
    """The ServiceResponse of a decoded response tuple."""
    request_id, success, result, error, error_type, error_origin, remote_traceback, metadata, degraded = message
    return ServiceResponse(success, result, error, request_id, error_type, error_origin, remote_traceback, metadata, degraded)


# --------------------------------------------------------------------------- decoding


def _parse_oob_header(record: bytes) -> tuple[bool, list[int], int, str, int]:
    """(main in segment, buffer lengths, main length, segment name, offset of the inline pickle)."""
    try:
        _, main_in_segment, count, main_len = _OOB_HEAD.unpack_from(record, 0)
        pos = _OOB_HEAD.size
        if count > (len(record) - pos) // _LEN.size:
            raise DecodeError(f"out-of-band record claims {count} buffers in {len(record)} bytes")
        lengths = [_LEN.unpack_from(record, pos + i * _LEN.size)[0] for i in range(count)]
        pos += count * _LEN.size
        (name_len,) = _NAME_LEN.unpack_from(record, pos)
        pos += _NAME_LEN.size
        name = bytes(record[pos : pos + name_len]).decode()
    except (struct.error, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed out-of-band record header: {exc}") from None
    if not _SEGMENT_RE.match(name):
        raise DecodeError(f"out-of-band record names an invalid segment {name!r}")
    return bool(main_in_segment), lengths, main_len, name, pos + name_len


def _open_segment(name: str, size: int) -> mmap.mmap | None:
    """Open, check, unlink and map a segment (copy-on-write). None for an empty one."""
    path = os.path.join(queue_directory(), name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DecodeError(f"out-of-band segment {name} is gone (its sender or the janitor removed it)") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            # Not ours to trust: never unpickle from it, and leave it to its owner.
            raise DecodeError(
                f"out-of-band segment {name} belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}; "
                "refusing to read it"
            )
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


def decode(record: bytes) -> tuple[Any, ...]:
    """The message tuple of one record; raises DecodeError (its segment, if any, is unlinked)."""
    if record[:1] == b"\x80":
        try:
            message = pickle.loads(record)
        except Exception as exc:
            raise DecodeError(f"undecodable record of {len(record)} bytes: {type(exc).__name__}: {exc}") from None
    elif record[:1] == b"O":
        main_in_segment, lengths, main_len, name, pos = _parse_oob_header(record)
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
            message = pickle.loads(data, buffers=buffers)
        except Exception as exc:
            raise DecodeError(f"undecodable out-of-band record ({name}): {type(exc).__name__}: {exc}") from None
        finally:
            del data, view
    else:
        raise DecodeError(f"unknown record type {record[:1]!r} ({len(record)} bytes)")
    if type(message) is not tuple or len(message) != 9:
        raise DecodeError(f"record decoded to {type(message).__name__}, not a kservice message")
    return message


def discard(record: bytes) -> None:
    """Drop a record without decoding it, unlinking its out-of-band segment (never raises)."""
    if record[:1] == b"O":
        with contextlib.suppress(Exception):
            unlink_segment(_parse_oob_header(record)[3])


def unlink_segment(name: str | None) -> None:
    """Remove a segment by name; a segment already gone is fine."""
    if name:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(queue_directory(), name))


# --------------------------------------------------------------------------- janitor


def reclaim_segments(pid_alive: Callable[[int], bool], older_than: float = 600.0) -> list[str]:
    """Remove segments no live process will read; returns their names.

    A segment is removed when its receiver is gone, or when its sender is gone
    and it is older than ``older_than`` seconds (its record was lost).
    """
    removed = []
    now = time.time()
    directory = queue_directory()
    for entry in os.scandir(directory):
        match = _SEGMENT_RE.match(entry.name)
        if match is None:
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
