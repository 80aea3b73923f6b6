"""``kservice dashboard``: a live web page of every service this host can reach.

A Starlette application served by uvicorn (``pip install 'kservice[dashboard]'``).
Routes:

- ``/``: the page (HTML, JavaScript and SVG charts shipped in this package; no
  network access needed);
- ``/api/state``: the newest snapshot and the history as one JSON object;
- ``/events``: server-sent events, one ``snapshot`` event per sample (the
  first also carries the history). A browser that goes away ends only its own
  stream.

Only ``kservice.cli`` imports this package, and only for the ``dashboard``
command: ``import kservice`` does not load Starlette or uvicorn.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import IO, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._config import Config
from ._collector import Collector

__all__ = ["Collector", "bind", "create_app", "run"]

_STATIC = resources.files(__name__) / "static"


def create_app(collector: Collector, *, poll: float = 0.2) -> Starlette:
    """The dashboard's ASGI application over ``collector`` (started and stopped with the app's lifespan)."""
    import anyio
    from sse_starlette.sse import EventSourceResponse

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        collector.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(collector.stop)

    async def index(request: Request) -> Response:
        return HTMLResponse((_STATIC / "index.html").read_text(encoding="utf-8"))

    async def state(request: Request) -> Response:
        version, snapshot = collector.latest()
        return JSONResponse(dict(snapshot, version=version, history=collector.history()))

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[dict[str, Any]]:
            sent = -1
            while True:
                version, snapshot = collector.latest()
                if version != sent and version > 0:
                    payload = dict(snapshot, version=version)
                    if sent < 0:
                        payload["history"] = collector.history()
                    sent = version
                    yield {"event": "snapshot", "data": json.dumps(payload, separators=(",", ":"))}
                await anyio.sleep(poll)

        # sse-starlette ends the stream when the client disconnects or the server shuts down.
        return EventSourceResponse(stream(), ping=15)

    static_dir = str(_STATIC)
    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/state", state),
            Route("/events", events),
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ],
        lifespan=lifespan,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises OSError when the address is in use or cannot be bound. Binding
    here, before uvicorn starts, turns that into one clear error.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run(
    sock: socket.socket,
    config: Config,
    *,
    interval: float = 1.0,
    out: IO[str] | None = None,
) -> int:
    """Serve the dashboard on the bound ``sock`` until SIGINT or SIGTERM; returns the exit status (0).

    Prints one line with the URL once listening and one when stopped. Open
    event streams are closed at shutdown.
    """
    import uvicorn

    out = out or sys.stdout
    app = create_app(Collector(config, interval=interval))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # uvicorn re-raises the signal that stopped it once it has shut down: make SIGTERM, like Ctrl-C,
    # end up here as KeyboardInterrupt rather than kill the process before the "stopped" line.
    previous = signal.signal(signal.SIGTERM, interrupted)
    print(f"kservice dashboard at {_url(sock)} (Ctrl-C to stop)", file=out, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    print("kservice dashboard stopped", file=out, flush=True)
    return 0
