"""The live camera: a WebSocket session per browser tab, its frames followed as tracks.

Protocol (``/api/live``, optionally ``?classes=a,b,c``): the page sends each frame as one binary message, an 8-byte
little-endian float (the frame's capture time in milliseconds) followed by a JPEG or PNG of the frame, downscaled
by the page; the server answers each frame it classified with one JSON text message ``{"t", "width", "height",
"faces": [{"track", "box", "label", "score", "probabilities"}]}`` (label, score and probabilities smoothed along
the track; ``t`` echoes the capture time, null when it was not a number). WebSocket because frames flow both ways
for as long as the camera runs, over one connection that the server's limits already govern.

* At most one frame per session is with the model; a frame that arrives while another waits replaces it (the
  newest is what matters), and the page sends its next frame when the answer arrives, at most ``max_fps`` a second.
* Every frame passes the same checks as an upload: its bytes (``--max-upload-mb``), its pixels (the pixel limit,
  the pixels in flight), the decoder's format allowlist.
* A session ends when the tab closes, after ``idle`` seconds without a frame, or after ``max_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from typing import Any

from ..core.errors import CepromptError
from ..data.images import ImageError
from ..video.tracking import FaceTracks
from .limits import Busy, PixelBudget, admitted
from .worker import Job, ModelWorker

log = logging.getLogger("ceprompt.server")
MAX_LIVE_SIDE = 1280  # pixels: frames are downscaled by the page; larger ones are scaled here
DEFAULT_IDLE = 30.0
DEFAULT_MAX_SECONDS = 3600.0
DEFAULT_MAX_FPS = 15.0


class LiveSession:
    """One tab's camera: the latest frame waiting, one frame at the model at a time, the tab's own tracks."""

    def __init__(self, websocket: Any, worker: ModelWorker, budget: PixelBudget, classes: tuple[str, ...] | None,
                 max_bytes: int, idle: float = DEFAULT_IDLE, max_seconds: float = DEFAULT_MAX_SECONDS,
                 max_fps: float = DEFAULT_MAX_FPS) -> None:
        self.ws, self.worker, self.budget, self.classes = websocket, worker, budget, classes
        self.max_bytes, self.idle, self.max_seconds, self.max_fps = max_bytes, idle, max_seconds, max_fps
        self.pending: tuple[float, bytes] | None = None
        self.arrived = asyncio.Event()
        self.tracks: FaceTracks | None = None
        self.last_time = -math.inf
        self.frames = 0

    async def run(self) -> None:
        from fastapi import WebSocketDisconnect

        started = time.monotonic()
        reader = asyncio.create_task(self._receive())
        try:
            while True:
                remaining = self.max_seconds - (time.monotonic() - started)
                if remaining <= 0:
                    await self._close(1000, "the live session reached its time limit; start the camera again")
                    return
                try:
                    await asyncio.wait_for(self.arrived.wait(), timeout=min(self.idle, remaining))
                except asyncio.TimeoutError:
                    if not reader.done():
                        await self._close(1000, f"no frame for {self.idle:.0f} s")
                    return
                if reader.done() and self.pending is None:
                    return
                self.arrived.clear()
                frame, self.pending = self.pending, None
                if frame is not None:
                    await self._answer(*frame)
                    await asyncio.sleep(1.0 / self.max_fps)  # a frame rate cap, whatever the page sends
        except WebSocketDisconnect:
            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _receive(self) -> None:
        """Keep only the newest frame; a closed tab ends the session."""
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    continue  # text messages carry nothing the server needs
                if len(data) > self.max_bytes + 8:
                    await self._close(1009, f"a frame of {len(data)} bytes; at most {self.max_bytes} are taken")
                    return
                if len(data) < 9:  # a protocol error, not a bad picture: the session ends
                    await self._close(1007, f"a frame of {len(data)} bytes: expected an 8-byte capture time, then "
                                            "an image")
                    return
                (stamp,) = struct.unpack("<d", data[:8])
                self.pending = (stamp, data[8:])  # replaces a frame still waiting
                self.arrived.set()
        finally:
            self.arrived.set()

    async def _answer(self, stamp_ms: float, data: bytes) -> None:
        with self.worker.arriving() as arrival:
            await self._classify(arrival, stamp_ms, data)

    async def _classify(self, arrival: Any, stamp_ms: float, data: bytes) -> None:
        self.frames += 1
        name = f"frame {self.frames}"
        try:
            async with admitted(self.budget, data, name, MAX_LIVE_SIDE) as frame:
                if self.tracks is None:
                    names = await self.worker.call(lambda: self.worker.recognizer_for(self.classes).class_names)
                    self.tracks = FaceTracks(names)
                # the page's capture clock, in seconds; a time that goes back or is not a number keeps the last one
                if math.isfinite(stamp_ms) and stamp_ms / 1000.0 >= self.last_time:
                    self.last_time = stamp_ms / 1000.0
                elif not math.isfinite(self.last_time):
                    self.last_time = 0.0
                answer = await arrival.run(Job(frame.image, classes=self.classes, tracks=self.tracks,
                                               time=self.last_time))
        except Busy:
            await self._send({"error": "busy with other requests; this frame was skipped"})
            return
        except (ImageError, CepromptError) as exc:
            await self._send({"error": str(exc)})
            return
        except MemoryError:
            await self._send({"error": "the server is short of memory; this frame was skipped"})
            return
        faces = [{"track": f.track, "box": [round(v * frame.scale, 1) for v in f.face.box], "label": f.smoothed_label,
                  "score": round(f.smoothed_score, 4), "probabilities": {k: round(v, 4) for k, v in f.smoothed.items()}}
                 for f in answer.faces]
        stamp = stamp_ms if math.isfinite(stamp_ms) else None  # NaN is not JSON: the page could not parse it
        await self._send({"t": stamp, "width": frame.width, "height": frame.height, "faces": faces,
                          "left_out": answer.left_out, "classes": answer.recognizer.class_names})

    async def _send(self, body: dict[str, Any]) -> None:
        await self.ws.send_json(body)

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=reason[:120])
