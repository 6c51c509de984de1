"""An ASGI layer in front of the web app: who may call it, how much they may send, how slowly.

* Host: only the names the server is reached by (loopback names, the listening address, and on
  0.0.0.0 this machine's names and any IP address; more with ``--allow-host``). A page on another
  site cannot reach the model through DNS rebinding.
* Origin: a browser request that changes something (POST), and the live camera's WebSocket, must come from the
  page itself or an origin given with ``--allow-origin``; other sites' pages are refused.
* Body size: refused from ``Content-Length`` before anything is read, and counted while streaming
  (chunked uploads), so an oversize upload is never received in full or spooled to disk.
* Body time: the whole body must arrive within ``body_timeout`` seconds.
* Every response carries a Content-Security-Policy without inline script, and nosniff headers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
# FastAPI's own /docs and /redoc pages load Swagger UI from a CDN with inline script: they get their own policy.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
DOCS_PATHS = ("/docs", "/redoc")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
WILDCARDS = {"0.0.0.0", "::", ""}
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around the file itself


def _host_name(value: str) -> str:
    """The host part of a Host header or origin netloc, lower-case, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_hosts(listen: str, extra: Iterable[str] = ()) -> set[str]:
    names = set(LOOPBACK_NAMES) | {_host_name(listen)} | {_host_name(h) for h in extra}
    if listen in WILDCARDS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return names


class Guard:
    def __init__(self, app: Callable[..., Awaitable[None]], listen: str, max_body: int,
                 allow_origins: Iterable[str] = (), allow_hosts: Iterable[str] = (), body_timeout: float = 60.0
                 ) -> None:
        self.app = app
        self.hosts = allowed_hosts(listen, allow_hosts)
        self.any_ip = listen in WILDCARDS  # reached by whatever address this machine has
        self.origins = {o.rstrip("/").lower() for o in allow_origins}
        self.max_body = max_body + MULTIPART_OVERHEAD
        self.body_timeout = body_timeout

    def host_ok(self, host: str) -> bool:
        name = _host_name(host)
        return name in self.hosts or (self.any_ip and _is_ip(name))

    def origin_ok(self, origin: str, host: str) -> bool:
        if origin.rstrip("/").lower() in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.host_ok(host):
            await _reply(send, 421, f"this server does not answer to host {host!r} (start it with --allow-host)")
            return
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin and not self.origin_ok(origin, host):
            await _reply(send, 403, f"requests from {origin} are refused (start the server with --allow-origin)")
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await _reply(send, 413, f"upload of {int(declared)} bytes exceeds the limit of "
                                    f"{self.max_body - MULTIPART_OVERHEAD} bytes", close=True)
            return
        state = {"received": 0, "responded": False, "started": False}
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def guarded_send(message: Message) -> None:
            if state["responded"]:
                return  # we already answered (413/408); the app's late reply is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
                message = {**message, "headers": [*message.get("headers", []), *_security_headers(scope["path"])]}
            await send(message)

        async def guarded_receive() -> Message:
            if state["responded"]:
                return {"type": "http.disconnect"}
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                await refuse(408, f"the upload did not arrive within {self.body_timeout:.0f} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    await refuse(413, f"upload exceeds the limit of {self.max_body - MULTIPART_OVERHEAD} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def refuse(status: int, detail: str) -> None:
            if not state["started"]:
                await _reply(send, status, detail, close=True)
            state["responded"] = True

        await self.app(scope, guarded_receive, guarded_send)


    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The live camera's WebSocket: the same Host check, and an Origin that must be the page's own (a browser
        always sends one; a page on another site must not reach the camera session, as with a POST)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host, origin = headers.get("host", ""), headers.get("origin")
        if not self.host_ok(host) or (origin is not None and not self.origin_ok(origin, host)):
            await send({"type": "websocket.close", "code": 1008})  # before accepting: an HTTP 403
            return
        await self.app(scope, receive, send)


def _security_headers(path: str) -> list[tuple[bytes, bytes]]:
    policy = DOCS_CSP if path.startswith(DOCS_PATHS) else CSP
    return [(b"content-security-policy", policy.encode()), *SECURITY_HEADERS]


async def _reply(send: Send, status: int, detail: str, close: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *_security_headers("")]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
