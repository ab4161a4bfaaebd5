"""A real HTTP server on 127.0.0.1 that serves a folder only to requests with the right bearer token.

It answers ``Range: bytes=N-`` with 206 (so reads resume), 401 without the token, 403 with a
wrong one, redirects the paths in ``server.redirects`` (302), answers 503 to the next
``server.unavailable`` requests, and records each request's path and Authorization header.
"""

from __future__ import annotations

import http.server
import re
import threading
from contextlib import contextmanager
from pathlib import Path

__all__ = ["token_server", "send_ranged_headers"]


def send_ranged_headers(handler: http.server.BaseHTTPRequestHandler, size: int, etag: str) -> int:
    """Answer a GET of ``size`` bytes: 206 from the ``Range: bytes=N-`` asked, else 200; returns N (0)."""
    asked = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
    start = int(asked.group(1)) if asked else 0
    if asked:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
    else:
        handler.send_response(200)
    handler.send_header("Content-Length", str(size - start))
    handler.send_header("ETag", etag)
    handler.end_headers()
    return start


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv, auth = self.server, self.headers.get("Authorization")
        with srv.lock:
            srv.requests.append((self.path, auth))
            busy = srv.unavailable > 0
            srv.unavailable -= busy
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if srv.token is not None and auth != f"Bearer {srv.token}":
            self.send_error(401 if auth is None else 403)
            return
        if busy:
            self.send_error(503)
            return
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = send_ranged_headers(self, len(data), f'"{path.stat().st_mtime_ns}"')
        self.wfile.write(data[start:])


@contextmanager
def token_server(root: Path, token: str | None):
    """Serve ``root`` on 127.0.0.1 for a ``with`` block (``token`` None: to anyone); yields the server
    (``.base`` its URL; ``.requests``, ``.redirects``, ``.unavailable`` as above)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.root, server.token, server.lock = Path(root), token, threading.Lock()
    server.requests, server.redirects, server.unavailable = [], {}, 0
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
