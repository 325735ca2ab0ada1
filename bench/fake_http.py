"""The HTTP plumbing shared by the fake Label Studio servers (bench/fake_ls.py and the tests' fakes).

`RouteServer(route)` serves on a free loopback port from a daemon thread; every request is
read whole (body included, so keep-alive connections stay in step) and handed to
`route(Request) -> Reply | DROP`. Logs are silent, and so are clients that hang up mid-answer
(killed workers, streams closed early); any other error in a route is printed as http.server does.
Standard library only: bench scripts import it without pytest, tests import it as `bench.fake_http`.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

JSON: Final = "application/json"
DROP: Final = object()  # a route's answer: close the connection without a response


@dataclass(frozen=True)
class Request:
    """One request as received; `target` is the path with its query string, as sent."""

    method: str
    target: str
    headers: Message
    raw: bytes
    started: float  # time.perf_counter() before the body was read

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    def json(self) -> Any:
        """The body parsed as JSON (None when empty); invalid JSON raises."""
        return json.loads(self.raw) if self.raw else None


class Reply:
    """A response. A bytes body goes out as it is, anything else as JSON, encoded right here (so
    under whatever lock the route holds while it makes the reply).

    `content_type` None sends no Content-Type of its own; `headers` are added (and win).
    """

    __slots__ = ("status", "data", "content_type", "headers")

    def __init__(self, status: int, body: Any = None, content_type: str | None = JSON,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.data: bytes = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.content_type = content_type
        self.headers: dict[str, str] = dict(headers or {})


Route = Callable[[Request], object]  # -> Reply, or DROP


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RouteServer:
    """A threaded HTTP server on `host` (random port) answering with `route`; `url` is its base URL.

    `keep_alive` picks HTTP/1.1 (else 1.0: one request per connection); `nodelay` sets TCP_NODELAY
    (headers and body go out in two writes: without it, Nagle + the client's delayed ACK add ~40 ms
    to every keep-alive request); `after(request)` runs once a reply has been written.
    """

    def __init__(self, route: Route, *, host: str = "127.0.0.1", keep_alive: bool = True,
                 nodelay: bool = False, after: Callable[[Request], None] | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"
            disable_nagle_algorithm = nodelay

            def log_message(self, *args) -> None:
                pass

            def serve(self) -> None:
                started = time.perf_counter()
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""  # read even when refusing: keep-alive
                request = Request(self.command, self.path, self.headers, raw, started)
                reply = route(request)
                if reply is DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                assert isinstance(reply, Reply), f"route answered {reply!r}"
                data = reply.data
                headers = {"Content-Type": reply.content_type} if reply.content_type else {}
                headers.update(reply.headers)
                self.send_response(reply.status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if after is not None:
                    after(request)

            do_GET = do_POST = do_PATCH = do_DELETE = serve  # noqa: N815 - http.server API

        self.server = _QuietServer((host, 0), Handler)
        self.host = host
        self.port: int = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "RouteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
