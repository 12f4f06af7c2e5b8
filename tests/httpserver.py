"""A real HTTP server on 127.0.0.1 for tests of the download and remote-read paths.

Why not mocks: the code under test talks to servers through two different HTTP stacks
(``requests`` for downloads, GDAL's libcurl for ``/vsicurl/`` COG reads), and what matters
(range requests, resumption, retries, dropped connections) is their real behaviour on the
wire. :class:`RangeHTTPServer` serves a directory from a thread on an ephemeral port with

* single-range support (``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n`` -> ``206`` with
  ``Content-Range``; ``416`` when the range starts past the end; ``Accept-Ranges: bytes``;
  ``HEAD``; an ``ETag``),
* counters: body bytes served per path (to prove that a windowed read fetched only a
  fraction of a file) and a log of every request (method, path, Range header, status),
* fault injection: :meth:`RangeHTTPServer.fail_next` answers the next n requests with an
  error status, :meth:`RangeHTTPServer.truncate_next` drops the connection after a number
  of body bytes of the next GET of a path.

Symbolic links inside the served directory are followed (tests link shared fixtures in).
Use the ``http_server`` fixture (a fresh server per test, serving ``tmp_path / "www"``) or
``with RangeHTTPServer(directory) as srv: ...``.
"""

from __future__ import annotations

import email.utils
import os
import posixpath
import re
import socket
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_TYPES = {".json": "application/json", ".tif": "image/tiff", ".tiff": "image/tiff"}


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    status: int


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: a clean teardown
    block_on_close = True
    owner: RangeHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers at teardown
    timeout = 5  # a client that connects and says nothing cannot hold teardown for long

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return None

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        url_path = unquote(urlsplit(self.path).path)
        rng = self.headers.get("Range")
        fail = owner._take_failure(url_path)
        if fail is not None:
            self._empty(fail, url_path, rng)
            return
        file = owner._local(url_path)
        if file is None or not file.is_file():
            self._empty(404, url_path, rng)
            return
        st = file.stat()
        size = st.st_size
        start, end, status = 0, size - 1, 200
        if rng is not None and "," not in rng:  # a multi-range request gets the whole file
            m = _RANGE_RE.match(rng)
            if m and (m.group(1) or m.group(2)):
                a, b = m.group(1), m.group(2)
                if a:
                    start, end = int(a), min(int(b), size - 1) if b else size - 1
                else:  # suffix range: the last n bytes
                    start, end = max(0, size - int(b)), size - 1
                if start >= size or end < start:
                    self._empty(416, url_path, rng, {"Content-Range": f"bytes */{size}"})
                    return
                status = 206
        length = end - start + 1
        # Log before answering: a client that got its answer must find its request logged.
        owner._log(Request(self.command, url_path, rng, status))
        self.send_response(status)
        ctype = _TYPES.get(file.suffix.lower(), "application/octet-stream")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        cut = owner._take_truncation(url_path)
        todo = length if cut is None else min(length, cut)
        sent = 0
        try:
            with open(file, "rb") as f:
                f.seek(start)
                while sent < todo:
                    chunk = f.read(min(1 << 16, todo - sent))
                    if not chunk:
                        break
                    # Counted before the write, so a client never sees bytes not yet counted.
                    owner._count(url_path, len(chunk))
                    self.wfile.write(chunk)
                    sent += len(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up
        if cut is not None and cut < length:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _empty(self, status: int, url_path: str, rng: str | None,
               headers: dict[str, str] | None = None) -> None:
        self.server.owner._log(Request(self.command, url_path, rng, status))
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


class RangeHTTPServer:
    """Serve ``directory`` on ``http://127.0.0.1:<ephemeral port>/`` from a background thread."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.root = Path(directory)
        self._lock = threading.Lock()
        self.bytes_served: dict[str, int] = defaultdict(int)
        self.requests: list[Request] = []
        self._failures: list[tuple[int, str | None]] = []
        self._truncations: dict[str, list[int]] = defaultdict(list)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> RangeHTTPServer:
        """Bind an ephemeral port on 127.0.0.1 and serve in a thread."""
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"RangeHTTPServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the handler threads."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = self._thread = None

    def __enter__(self) -> RangeHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The URL of ``path`` (relative to the served directory, '/'-separated)."""
        return f"{self.base_url}/{path.lstrip('/')}"

    # -- counters --------------------------------------------------------------------
    def served(self, path: str) -> int:
        """Body bytes sent so far for ``path`` (relative, as given to :meth:`url`)."""
        with self._lock:
            return self.bytes_served.get("/" + path.lstrip("/"), 0)

    def requests_for(self, path: str, method: str | None = None) -> list[Request]:
        """Requests seen for ``path`` (optionally only one method)."""
        p = "/" + path.lstrip("/")
        with self._lock:
            return [r for r in self.requests
                    if r.path == p and (method is None or r.method == method)]

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()

    # -- fault injection -------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503, path: str | None = None) -> None:
        """Answer the next ``n`` requests (for ``path``, or any) with ``status`` and no body."""
        p = None if path is None else "/" + path.lstrip("/")
        with self._lock:
            self._failures.extend([(status, p)] * n)

    def truncate_next(self, path: str, nbytes: int) -> None:
        """Drop the connection after ``nbytes`` body bytes of the next GET of ``path``.

        The headers still announce the full length, as a real dropped download does.
        """
        with self._lock:
            self._truncations["/" + path.lstrip("/")].append(int(nbytes))

    # -- handler side ----------------------------------------------------------------
    def _take_failure(self, url_path: str) -> int | None:
        with self._lock:
            for i, (status, p) in enumerate(self._failures):
                if p is None or p == url_path:
                    del self._failures[i]
                    return status
        return None

    def _take_truncation(self, url_path: str) -> int | None:
        with self._lock:
            q = self._truncations.get(url_path)
            return q.pop(0) if q else None

    def _log(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def _count(self, url_path: str, n: int) -> None:
        with self._lock:
            self.bytes_served[url_path] += n

    def _local(self, url_path: str) -> Path | None:
        rel = posixpath.normpath(url_path).lstrip("/")
        if rel.startswith("..") or "\\" in rel or "\x00" in rel:
            return None
        return self.root / rel if rel not in ("", ".") else None


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    """A fresh :class:`RangeHTTPServer` serving ``tmp_path / "www"`` (created empty)."""
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    with RangeHTTPServer(root) as srv:
        yield srv
