"""A real HTTP server on 127.0.0.1 that serves photos and misbehaves on purpose, for the
download stage's tests and benchmark.

Routes (`NAME` is a file in one of the served folders):

- `/img/NAME`: the file, `image/jpeg` (HTTP/1.1 keep-alive);
- `/status/CODE/NAME`: always HTTP CODE (404, 500, 403, ...);
- `/flaky/K/NAME`: HTTP 500 for the first K requests of this path, then the file;
- `/ratelimit/K/NAME`: HTTP 429 (`Retry-After: 0`) for the first K requests, then the file;
- `/slow/SECONDS/NAME`: waits, then the file;
- `/truncated/NAME`: announces the whole file, sends half of it, closes;
- `/cut/NAME`: the first half of the file with a matching Content-Length (a broken JPEG);
- `/huge/MB`: `MB` megabytes of zeros, no Content-Length, `image/jpeg`;
- `/declared/BYTES`: announces `Content-Length: BYTES`, sends 10 bytes;
- `/gzipbomb`: 64 MB of zeros sent gzip-compressed (`Content-Encoding: gzip`, ~64 KB);
- `/wrongtype/NAME`: the file as `text/html`;
- `/notimage`: an HTML page labelled `image/jpeg`;
- `/loop/a`, `/loop/b`: redirect to each other;
- `/chain/K/NAME`: K redirects (relative Locations), then the file;
- `/redirect?to=URL`: 302 to URL (anything: e.g. a private address);
- `/reset`: closes the connection without a response;
- `/fail/MODE/K/NAME`: misbehaves for the first K requests of this path, then serves the
  file; MODE is `500`, `slow` (waits `slow_s` seconds, 3 by default), `truncated` or
  `reset`; with MODE `busy`, K is seconds: HTTP 503 with `Retry-After` for K seconds after
  the path's first request (a server that wants clients to wait, not to hammer it).

`server.requests` lists every request path, in order, for tests to check what was fetched
(and what was not). Run as a script (`python -m tests.helpers_http FOLDER...`) it serves in its
own process and prints its port, which is what the benchmark does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import http.server
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

__all__ = ["PhotoServer", "serve_photos"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _redirect(self, location: str, code: int = 302) -> None:
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, name: str) -> bytes | None:
        for folder in self.server.folders:
            path = (folder / name).resolve()
            if path.parent == folder and path.is_file():
                return path.read_bytes()
        return None

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        with self.server.lock:
            self.server.requests.append(self.path)
            self.server.counts[parts.path] += 1
            count = self.server.counts[parts.path]
            first = self.server.first_seen.setdefault(parts.path, time.monotonic())
        seg = parts.path.strip("/").split("/")
        kind = seg[0]
        try:
            if kind == "fail" and len(seg) == 4:
                self._fail(seg[1], float(seg[2]), seg[3], count, first)
            else:
                self._route(kind, seg, count, parts.query)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _fail(self, mode: str, k: float, name: str, count: int, first: float) -> None:
        if mode == "busy":
            left = first + k - time.monotonic()
            if left > 0:
                wait = str(max(1, round(left + 0.5)))
                return self._send(503, b"busy", "text/plain", Retry_After=wait)
        elif count <= k:
            if mode == "500":
                return self._send(500, b"oops", "text/plain")
            if mode == "slow":
                time.sleep(self.server.slow_s)
            elif mode in ("truncated", "reset"):
                return self._route(mode, [mode, name], count, "")
        return self._route("img", ["img", name], count, "")

    def _route(self, kind: str, seg: list[str], count: int, query: str) -> None:
        if kind == "img" and len(seg) == 2:
            data = self._file(seg[1])
            return self._send(200, data) if data is not None else self._send(404, b"", "text/plain")
        if kind == "status":
            return self._send(int(seg[1]), b"nope", "text/plain")
        if kind in ("flaky", "ratelimit"):
            if count <= int(seg[1]):
                code = 500 if kind == "flaky" else 429
                return self._send(code, b"try again", "text/plain", Retry_After="0")
            return self._route("img", ["img", seg[2]], count, query)
        if kind == "slow":
            time.sleep(float(seg[1]))
            return self._route("img", ["img", seg[2]], count, query)
        if kind in ("truncated", "cut"):
            data = self._file(seg[1]) or b""
            half = data[: len(data) // 2]
            if kind == "cut":
                return self._send(200, half)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(half)
            self.wfile.flush()
            self.close_connection = True
            return None
        if kind == "huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            chunk = b"\0" * (1 << 16)
            for _ in range(int(seg[1]) * 16):
                self.wfile.write(chunk)
                with self.server.lock:
                    self.server.huge_bytes_sent += len(chunk)
            return None
        if kind == "declared":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", seg[1])
            self.end_headers()
            self.wfile.write(b"\xff\xd8" + b"\0" * 8)
            self.close_connection = True
            return None
        if kind == "gzipbomb":
            return self._send(200, _gzip_bomb(), Content_Encoding="gzip")
        if kind == "wrongtype":
            return self._send(200, self._file(seg[1]) or b"", "text/html")
        if kind == "notimage":
            return self._send(200, b"<html><body>not a photo</body></html>", "image/jpeg")
        if kind == "loop":
            return self._redirect("/loop/b" if seg[1] == "a" else "/loop/a")
        if kind == "chain":
            left = int(seg[1])
            if left == 0:
                return self._route("img", ["img", seg[2]], count, query)
            return self._redirect(f"../{left - 1}/{seg[2]}", 301)
        if kind == "redirect":
            return self._redirect(parse_qs(query)["to"][0])
        if kind == "reset":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            return None
        return self._send(404, b"no such route", "text/plain")


@functools.lru_cache(maxsize=1)
def _gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * (64 << 20), compresslevel=9)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, folders: list[Path]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folders = [f.resolve() for f in folders]
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.counts: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        _gzip_bomb()  # compressed now, not inside a request that a client times out
        self.huge_bytes_sent = 0
        self.slow_s = 3.0


class PhotoServer:
    """The server running in a thread of this process (`serve_photos`)."""

    def __init__(self, server: _Server) -> None:
        self._server = server

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[str]:
        with self._server.lock:
            return list(self._server.requests)

    @property
    def huge_bytes_sent(self) -> int:
        with self._server.lock:
            return self._server.huge_bytes_sent

    def reset(self) -> None:
        """Forget the request log and the per-path counters (flaky routes fail again)."""
        with self._server.lock:
            self._server.requests.clear()
            self._server.counts.clear()
            self._server.first_seen.clear()
            self._server.huge_bytes_sent = 0


@contextlib.contextmanager
def serve_photos(*folders: Path) -> Iterator[PhotoServer]:
    """Serve the files of `folders` (by name, first match) on 127.0.0.1 (a free port) until
    the block ends."""
    server = _Server(list(folders))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield PhotoServer(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--slow-s", type=float, default=3.0, help="wait of /fail/slow/ routes")
    args = ap.parse_args(argv)
    server = _Server(args.folders)
    server.slow_s = args.slow_s
    print(server.server_address[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
