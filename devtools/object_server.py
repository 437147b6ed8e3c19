"""A real HTTP server on loopback that serves files of one folder with Range requests, ETag and
Last-Modified, as object stores do, and breaks in the ways they break (:class:`Fault`).

The tests (tests/test_urls.py) and the loopback-http benchmark (benchmarks/bench_url.py) point
bamcountd and samtools (htslib's libcurl) at it; it is here, not in tests/support/, because
benchmarks import nothing from tests.  A fault applies to the paths it
names, after the first ``after`` requests for them, so a count can start well and then fail
(a presigned URL that expires mid-count, a connection dropped on the tenth range).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

_RANGE = re.compile(r"\Abytes=([0-9]*)-([0-9]*)\Z")

#: What a :class:`Fault` does to a request.
FORBIDDEN = "403"
NOT_FOUND = "404"
DROP = "drop"  # headers and half the body, then the connection is reset
SHORT = "short"  # a Content-Length the body does not reach, then a clean close
IGNORE_RANGE = "ignore-range"  # 200 and the whole file, whatever Range asked
ERROR_503 = "503"  # a transient failure
SLOW = "slow"  # answers after SLOW_SECONDS
WRONG_REGION = "wrong-region"  # S3's 400 for a request not signed for BUCKET_REGION, which it names
BUCKET_REGION = "eu-west-2"
SLOW_SECONDS = 1.5


@dataclass
class Fault:
    """``mode`` for requests whose path ends with one of ``paths`` (every path if empty), once
    ``after`` such requests were served well, for ``times`` requests (None: for ever)."""

    mode: str
    paths: tuple[str, ...] = ()
    after: int = 0
    times: int | None = None
    seen: int = 0
    applied: int = 0

    def hits(self, path: str) -> bool:
        if self.paths and not path.endswith(self.paths):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.applied >= self.times):
            return False
        self.applied += 1
        return True


@dataclass
class Server:
    """The running server: its base URL, and what it is told to do and has seen."""

    root: Path
    port: int = 0
    fault: Fault | None = None
    #: A query parameter every request must carry with this value (a presigned URL's token).
    token: tuple[str, str] | None = None
    requests: list[str] = field(default_factory=list)
    #: The Authorization header of each request ("" for none).
    authorizations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str, query: str = "") -> str:
        return f"{self.base}/{name}" + (f"?{query}" if query else "")

    def proxy_env(self) -> dict[str, str]:
        """The variables that make libcurl and urllib send every http:// request here, as to a
        proxy (how a test reaches gs://, whose host htslib fixes)."""
        return {"http_proxy": self.base, "HTTP_PROXY": self.base, "no_proxy": "", "NO_PROXY": ""}

    def logged(self) -> str:
        with self.lock:
            return "\n".join(self.requests)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # each request is recorded once, in _serve

        def handle(self) -> None:
            with contextlib.suppress(ConnectionError):  # htslib closes connections it has read enough of
                super().handle()

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            parts = urlsplit(self.path)
            with server.lock:
                server.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}")
                server.authorizations.append(self.headers.get("Authorization", ""))
            path = parts.path
            if parts.netloc:  # a proxy's request (absolute URI): the host is the first folder
                path = f"/{parts.netloc}{parts.path}"
            if server.token is not None:
                name, value = server.token
                if parse_qs(parts.query).get(name) != [value]:
                    return self._status(403)
            with server.lock:
                fault = server.fault
                mode = fault.mode if fault is not None and fault.hits(path) else None
            if mode == SLOW:
                time.sleep(SLOW_SECONDS)
            if mode == WRONG_REGION and f"/{BUCKET_REGION}/s3/" not in self.headers.get("Authorization", ""):
                self.send_response(400)
                self.send_header("x-amz-bucket-region", BUCKET_REGION)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if mode in (FORBIDDEN, NOT_FOUND, ERROR_503):
                return self._status(int(mode))
            target = (server.root / path.lstrip("/")).resolve()
            if server.root.resolve() not in target.parents or not target.is_file():
                return self._status(404)
            stat = target.stat()
            size = stat.st_size
            start, end, partial = 0, size - 1, False
            asked = _RANGE.match(self.headers.get("Range", ""))
            if asked is not None and mode != IGNORE_RANGE:
                first, last = asked.groups()
                if first:
                    start, end = int(first), min(int(last) if last else size - 1, size - 1)
                else:
                    start = max(size - int(last), 0)
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                partial = True
            length = end - start + 1
            self.send_response(206 if partial else 200)
            self.send_header("Content-Length", str(length))
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            identity = f"{target}\0{size}\0{stat.st_mtime_ns}".encode()
            self.send_header("ETag", '"' + hashlib.md5(identity, usedforsecurity=False).hexdigest() + '"')
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            self.end_headers()
            if not body:
                return None
            cut = mode in (DROP, SHORT)
            with open(target, "rb") as handle:
                handle.seek(start)
                left = length // 2 if cut else length
                while left > 0:
                    block = handle.read(min(left, 1 << 20))
                    if not block:
                        break
                    self.wfile.write(block)
                    left -= len(block)
            if cut:
                self.wfile.flush()
                if mode == DROP:  # a reset, not a close: what a dying proxy does
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.close_connection = True
            return None

        def _status(self, code: int) -> None:
            text = f"{code}\n".encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(text)

    return Handler


@contextmanager
def serve(root: Path) -> Iterator[Server]:
    """Serve ``root`` on a free loopback port until the block ends."""
    state = Server(root=root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
