"""What keeps the web server up under load and silence: a budget of decoded pixels in flight, images scaled down
before they wait for the model, memory handed back to the system, a connection cap, a header timeout and logs
that do not flood.

* Pixels in flight: every upload's pixel count is read from its header; when the images already decoded or
  being decoded would exceed the budget with it, the request is answered 503 with ``Retry-After`` at once,
  before it is decoded. Sixteen 49-megapixel uploads at once held several gigabytes before.
* Waiting images are at most :data:`MAX_SIDE` pixels on a side (faces are found and cut on that copy; boxes are
  given in the upload's own pixels).
* After a large image, freed memory is returned to the system (glibc keeps it otherwise: 3-5 GB stayed held).
* Connections: at most ``max_connections`` open at once (more are closed at once, so the process never runs out
  of file descriptors); request headers must be complete within ``header_timeout`` seconds of the connection
  (or of the previous response), so headers trickled a byte at a time, or never sent, do not hold a connection;
  idle keep-alive connections close after ``keep_alive`` seconds.
* A message logged again and again (``accept()`` failing, refused connections) appears once per interval with a
  count of the repeats.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from typing import Any

from PIL import Image

MAX_SIDE = 4096  # 16.8 megapixels: faces of 2% of the shorter side stay over 60 px
DEFAULT_PIXEL_BUDGET = 120_000_000  # decoded pixels in flight (about 360 MB as RGB)
DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_KEEP_ALIVE = 5.0


class PixelBudget:
    """Decoded pixels that requests may hold at once; :meth:`take` says no instead of waiting."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        with self._lock:
            if self.used and self.used + pixels > self.limit:  # one image alone always fits (the pixel limit)
                return False
            self.used += pixels
            return True

    def give(self, pixels: int) -> None:
        with self._lock:
            self.used = max(0, self.used - pixels)


def scaled_for_queue(image: Image.Image) -> tuple[Image.Image, float]:
    """``image`` at most :data:`MAX_SIDE` on a side, and the factor that maps its pixels back to the original's."""
    side = max(image.size)
    if side <= MAX_SIDE:
        return image, 1.0
    scale = MAX_SIDE / side
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return small, image.width / small.width


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc keeps it for reuse otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class RepeatFilter(logging.Filter):
    """Lets a message through once per ``interval`` seconds; the next one that passes says how many were held."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self.last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        seen, held = self.last.get(key, (0.0, 0))
        if now - seen < self.interval:
            self.last[key] = (seen, held + 1)
            return False
        self.last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {now - seen:.0f} s)"
        return True


def guarded_protocol(max_connections: int, header_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a connection cap and a header timeout."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    log = logging.getLogger("ceprompt.server")

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("connection refused: %d open, the limit is %d (--max-connections)",
                            len(self.connections) - 1, max_connections)
                transport.close()
                return
            self._start_header_timer()

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            self.header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.warning("closed a connection whose request headers took over %.0f s", header_timeout)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._start_header_timer()  # the next request on this connection gets the same time

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol
