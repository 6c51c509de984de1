"""What keeps the web server up under load and silence: a budget of decoded pixels in flight, images scaled down
before they wait for the model, memory handed back to the system, a connection cap, a header timeout and logs
that do not flood.

* Pixels in flight: every upload's pixel count is read from its header; when the images already decoded or
  being decoded would exceed the budget with it, the request is answered 503 with ``Retry-After`` at once,
  before it is decoded. Sixteen 49-megapixel uploads at once held several gigabytes before.
* Uploads and live frames get in one way, :func:`admitted`. Waiting images are at most :data:`MAX_SIDE` pixels
  on a side (faces are found and cut on that copy; boxes are given in the upload's own pixels).
* After a large image, freed memory is returned to the system (glibc keeps it otherwise: 3-5 GB stayed held).
* Connections: at most ``max_connections`` open at once (more are closed at once, so the process never runs out
  of file descriptors), and at most a share of them per client address (one client holding sockets open cannot
  take them all; behind a reverse proxy every client has the proxy's address: raise the share there); request
  headers must be complete within ``header_timeout`` seconds of the connection
  (or of the previous response), so headers trickled a byte at a time, or never sent, do not hold a connection;
  idle keep-alive connections close after ``keep_alive`` seconds.
* A message logged again and again (``accept()`` failing, refused connections) appears once per interval with a
  count of the repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from PIL import Image

from ..data.images import image_size, open_image

MAX_SIDE = 4096  # 16.8 megapixels: faces of 2% of the shorter side stay over 60 px
DEFAULT_PIXEL_BUDGET = 120_000_000  # decoded pixels in flight (about 360 MB as RGB)
LARGE_IMAGE = 4_000_000  # pixels: after such an image, freed memory goes back to the system
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


def scaled_for_queue(image: Image.Image, max_side: int = MAX_SIDE) -> tuple[Image.Image, float]:
    """``image`` at most ``max_side`` on a side, and the factor that maps its pixels back to the original's."""
    side = max(image.size)
    if side <= max_side:
        return image, 1.0
    scale = max_side / side
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return small, image.width / small.width


class Busy(Exception):
    """The pixel budget cannot take one more image now (the caller answers "try again")."""


@dataclass
class Admitted:
    """An upload or live frame decoded and scaled for the queue; ``scale`` maps its pixels back to the original's."""

    image: Image.Image | None  # None once the ``admitted`` block has ended
    scale: float
    width: int  # of the original
    height: int


@contextlib.asynccontextmanager
async def admitted(budget: PixelBudget, data: bytes, name: str, max_side: int = MAX_SIDE
                   ) -> AsyncIterator[Admitted]:
    """The one way an upload or a live frame gets in: its pixel count read from the header (``ImageError``),
    charged to ``budget`` before it is decoded (:class:`Busy`), decoded through the one image opener, scaled to
    ``max_side``, and the budget then holding only the scaled copy. When the block ends the image is let go and
    the budget given back; after a large image, freed memory goes back to the system."""
    width, height = await asyncio.to_thread(image_size, data, name)
    held = width * height
    if not budget.take(held):
        raise Busy
    entry = None
    try:
        image, scale = await asyncio.to_thread(lambda: scaled_for_queue(open_image(data, name), max_side))
        budget.give(held - image.width * image.height)  # what waits for the model is the scaled copy
        held = image.width * image.height
        entry = Admitted(image, scale, width, height)
        image = None  # the entry holds the one reference, dropped when the block ends
        yield entry
    finally:
        budget.give(held)
        if entry is not None:
            entry.image = None
        if width * height > LARGE_IMAGE:
            await asyncio.to_thread(release_memory)


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


def per_client_default(max_connections: int) -> int:
    """A client's share of the connections by default: an eighth, at least 4."""
    return max(4, max_connections // 8)


def guarded_protocol(max_connections: int, header_timeout: float, per_client: int | None = None) -> tuple[type, type]:
    """uvicorn's HTTP/1.1 and WebSocket protocols with a connection cap, a per-client share of it and a header
    timeout: (HTTP protocol class, WebSocket protocol class)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    log = logging.getLogger("ceprompt.server")
    share = per_client if per_client is not None else per_client_default(max_connections)
    held: dict[str, int] = {}  # open connections per client address, HTTP and WebSocket alike

    def peer(transport: Any) -> str:
        address = transport.get_extra_info("peername")
        return str(address[0]) if isinstance(address, (tuple, list)) and address else "?"

    def admit(transport: Any, connections: set) -> str | None:
        """Count the connection; None when it may stay, else why it was closed."""
        client = peer(transport)
        held[client] = held.get(client, 0) + 1
        if len(connections) > max_connections:
            return f"{len(connections) - 1} open, the limit is {max_connections} (--max-connections)"
        if share and held[client] > share:
            return (f"{client} holds {held[client] - 1} connections, a client's share is {share} "
                    "(--max-connections-per-client)")
        return None

    def leave(transport: Any) -> None:
        client = peer(transport)
        held[client] = held.get(client, 1) - 1
        if held[client] <= 0:
            held.pop(client, None)

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        counted = False

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            refused = admit(transport, self.connections)
            self.counted = True
            if refused:
                log.warning("connection refused: %s", refused)
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

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._stop_header_timer()
            if self.counted:  # the WebSocket protocol counts the connection from here on
                self.counted = False
                leave(self.transport)
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            if self.counted:
                self.counted = False
                leave(self.transport)
            super().connection_lost(exc)

    class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.ceprompt_transport = transport
            refused = admit(transport, self.connections)
            if refused:
                log.warning("WebSocket refused: %s", refused)
                transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            leave(self.ceprompt_transport)
            super().connection_lost(exc)

    return GuardedH11Protocol, GuardedWebSocketProtocol
