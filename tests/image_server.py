"""A loopback image server in the atlas' layout for the download job's tests and benchmark.

It serves `/images/{a}/{rest}_{stain}.jpg` on 127.0.0.1 (a free port), with scripted responses per path:
good JPEGs, error statuses, slow answers, HTML pages, bodies cut short. Nothing here reaches another address.
"""

from __future__ import annotations

import http.server
import io
import threading
import time

import numpy as np
from PIL import Image

import schemas
from tests import fixtures

# RGB channels of the atlas' colour-coded single-stain JPEGs.
_CHANNELS = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}


def atlas_jpeg(seed: int, stain: str, size: int = 16, quality: int = 90) -> bytes:
    """A colour-coded stain JPEG as the atlas serves them: the stain's pixels in its RGB channel(s)."""
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    for c in _CHANNELS[stain]:
        rgb[..., c] = fixtures.stain_array(seed, size)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ok(body: bytes, content_type: str = "image/jpeg"):
    return ("ok", body, content_type)


def status(code: int, retry_after: float | None = None):
    """An error status; with `retry_after`, a Retry-After header (seconds)."""
    return ("status", code, retry_after)


def slow(seconds: float, body: bytes):
    return ("slow", seconds, body)


def cut(body: bytes):
    """Announces the whole body, sends half of it and closes the connection."""
    return ("cut", body)


HTML = ok(b"<!DOCTYPE html><html><body>Image not available</body></html>" * 4, "text/html")


class ImageServer:
    """An HTTP server on 127.0.0.1: path -> responses, one per request (the last one repeats); 404 otherwise.

    Every request's path is logged, with its (start, end) times in `times`; `latency` delays every response
    (for the concurrency benchmark).
    """

    def __init__(self, latency: float = 0.0):
        self.routes: dict[str, list] = {}
        self.log: list[str] = []
        self.times: list[tuple[float, float]] = []
        self.latency = latency
        self.first = None  # a response for the very first request, whatever its path (then the routes)
        self.first_answered = None  # when the answer to it began
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the atlas' server
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 (http.server's name)
                start = time.perf_counter()
                try:
                    self._answer()
                finally:
                    with server._lock:
                        server.times.append((start, time.perf_counter()))

            def _answer(self):
                with server._lock:
                    n = server.log.count(self.path)
                    first = server.first if not server.log else None
                    server.log.append(self.path)
                responses = server.routes.get(self.path, [status(404)])
                kind, *args = first or responses[min(n, len(responses) - 1)]
                if server.latency:
                    time.sleep(server.latency)
                if kind == "slow":
                    time.sleep(args[0])
                    kind, args = "ok", [args[1], "image/jpeg"]
                if first:
                    server.first_answered = time.perf_counter()  # just before it is sent
                if kind == "status":
                    body = b"error"
                    self.send_response(args[0])
                    if len(args) > 1 and args[1] is not None:
                        self.send_header("Retry-After", f"{args[1]:g}")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                body = args[0]
                self.send_response(200)
                self.send_header("Content-Type", args[1] if kind == "ok" else "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if kind == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients that time out close their end: not an error of the test

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/images"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def path(self, sample_id: str, stain: str) -> str:
        first, _, rest = sample_id.partition("_")
        return f"/images/{first}/{rest}_{stain}.jpg"

    def add_sample(self, sample_id: str, seed: int, size: int = 16, **special) -> dict[str, bytes]:
        """Serves the four stains of one Id; `special[stain]` = a response list replacing the good JPEG."""
        bodies = {s: atlas_jpeg(seed * 10 + k, s, size) for k, s in enumerate(schemas.STAINS)}
        for stain, body in bodies.items():
            self.routes[self.path(sample_id, stain)] = special.get(stain, [ok(body)])
        return bodies

    def requests(self, sample_id: str, stain: str) -> int:
        return self.log.count(self.path(sample_id, stain))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
