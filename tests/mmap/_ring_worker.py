"""Child-process roles for the ring tests and benchmark, started with ``subprocess``.

Usage: ``python _ring_worker.py ROLE ARGS...``.  Roles print one line
(``ready ...``) on stdout when they are set up, so the parent can synchronise.
The ring module is imported as ``kservice.plugins.mmap.ring``; the environment
variable ``KSERVICE_RING_PURE=1`` makes a worker run the pure-Python put/pop.
"""

from __future__ import annotations

import os
import struct
import sys
import time

from kservice.plugins.mmap import ring

TAG = struct.Struct("<II")  # producer id, sequence number


def ready(*extra: object) -> None:
    print("ready", *extra, flush=True)


def role_echo(req_name: str, resp_name: str, cpu: str = "-") -> None:
    """Own REQ; echo every record onto RESP until b'stop'."""
    if cpu != "-":
        os.sched_setaffinity(0, {int(cpu)})
    req = ring.create_queue(req_name, 1 << 22)
    resp = ring.attach_queue(resp_name)
    ready()
    try:
        while True:
            for rec in req.get_many(256):
                if rec == b"stop":
                    return
                resp.put(rec)
    finally:
        resp.close()
        req.unlink()
        req.close()


def role_producer(name: str, pid_tag: str, count: str, size: str = "0") -> None:
    """Put COUNT records tagged (id, seq), padded to SIZE bytes; COUNT -1: forever."""
    q = ring.attach_queue(name)
    ident, n, pad = int(pid_tag), int(count), b"p" * int(size)
    ready()
    seq = 0
    while n < 0 or seq < n:
        q.put(TAG.pack(ident, seq) + pad)
        seq += 1
    q.close()


def role_owner(name: str) -> None:
    """Create NAME and then sleep until killed."""
    q = ring.create_queue(name, 1 << 16)
    ready(q.owner_pid)
    time.sleep(3600)


def role_blocked_put(name: str) -> None:
    """Fill NAME, then block in put(); report how it ended and after how long."""
    q = ring.attach_queue(name)
    while True:
        try:
            q.put_nowait(b"f" * 1000)
        except ring.QueueFull:
            break
    ready()
    t0 = time.monotonic()
    try:
        q.put(b"f" * 1000, timeout=30)
        print("result put-succeeded", time.monotonic() - t0, flush=True)
    except ring.QueueError as exc:
        print("result", type(exc).__name__, time.monotonic() - t0, flush=True)
    q.close()


def role_idle_get(name: str) -> None:
    """Own NAME and wait in get() until a record arrives; print it."""
    q = ring.create_queue(name, 1 << 16)
    ready()
    rec = q.get(timeout=60)
    print("got", rec.decode(), flush=True)
    q.unlink()
    q.close()


def role_unpickle_put(pickled_hex: str, payload: str) -> None:
    """Unpickle a queue handle and put PAYLOAD through it."""
    import pickle

    q = pickle.loads(bytes.fromhex(pickled_hex))
    q.put(payload.encode())
    print("ready", q.name, flush=True)
    q.close()


def role_die_holding_lock(name: str, scribble: str) -> None:
    """Take the producers' lock, optionally half-write a record, then die by SIGKILL."""
    import signal

    q = ring.attach_queue(name)
    q._lock(None)
    if scribble == "1":
        tail = q._w64[ring._TAIL]
        pos = ring.HEADER_SIZE + tail % q.capacity
        q._mm[pos : pos + 16] = b"\xee" * 16  # a frame header and a few payload bytes
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def role_which_path(name: str) -> None:
    """Attach to NAME and report which put/pop this process runs ("compiled" or "pure")."""
    q = ring.attach_queue(name)
    ready("pure" if q._fast is None else "compiled")
    q.close()


ROLES = {
    "which_path": role_which_path,
    "unpickle_put": role_unpickle_put,
    "die_holding_lock": role_die_holding_lock,
    "echo": role_echo,
    "producer": role_producer,
    "owner": role_owner,
    "blocked_put": role_blocked_put,
    "idle_get": role_idle_get,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
