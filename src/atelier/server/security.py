"""Who may use `atelier serve`, and what a connection may cost it.

    allowed_hosts_for  the Host names to trust (Starlette's TrustedHostMiddleware checks HTTP and WebSocket)
    origin_allowed     the WebSocket Origin check: the server's own pages, and the origins given
    TokenMiddleware    `--auth-token`: every request but the static files needs the token
    http_protocol      uvicorn's HTTP protocol with a deadline for a request's headers
    websocket_protocol uvicorn's WebSocket protocol, answering a message over the size limit with a
                       JSON error before it closes the connection (code 1009)

uvicorn closes idle keep-alive connections, but has no deadline for the headers of a request still
arriving (h11 and httptools alike), so a client sending a header line now and then would hold its
connection forever; `http_protocol` closes a connection whose request head is not complete
`header_timeout` seconds after the connection opened or the previous response ended.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
from urllib.parse import parse_qsl, urlsplit

HEADER_TIMEOUT = 10.0
CLOSE_DRAIN_SECONDS = 5.0  # how long a refused oversized message may keep arriving after the close frame
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # as Host headers write them
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
PUBLIC_PATHS = ("/static/",)  # the page's script and style: no secrets, and a <script> tag sends no token


def is_loopback(host: str) -> bool:
    """Whether a listening address is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, given: list[str] | None = None) -> list[str]:
    """The Host names to accept: `given`, else the loopback names for a loopback server, the bound
    address and the loopback names for one address, anything for a wildcard address."""
    if given:
        return [_host_pattern(h) for h in given]
    if bind_host in WILDCARD_HOSTS:
        return ["*"]
    if is_loopback(bind_host):
        return list(LOOPBACK_HOSTS)
    shown = f"[{bind_host}]" if ":" in bind_host else bind_host
    return [shown.lower(), *LOOPBACK_HOSTS]


def _host_pattern(name: str) -> str:
    """An `--allowed-host` value as TrustedHostMiddleware matches it: a name, `*.domain` or `*`."""
    from atelier.errors import UserError

    name = name.strip().lower()
    if ":" in name and not name.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(name)}]"
        except ValueError:
            raise UserError(f"--allowed-host takes a host name without a port, got {name!r}") from None
    if not name or "*" in name[1:] or name.startswith("*") and name != "*" and not name.startswith("*."):
        raise UserError(f"--allowed-host must be a host name, *.domain or *, got {name!r}")
    return name


def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """A WebSocket handshake's Origin check. No Origin: not a browser (a browser always sends one),
    so nothing a page could abuse. The server's own origin (the Origin names the Host the request went
    to) is always allowed; other origins only when listed ("*" lists them all)."""
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host is not None and parts.netloc == host.strip().lower()


def normal_origin(origin: str) -> str:
    """An `--allowed-origin` value as browsers send it: scheme://host[:port], lower case."""
    origin = origin.strip().lower().rstrip("/")
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        from atelier.errors import UserError

        raise UserError(f"--allowed-origin must look like http://host:port or https://host, got {origin!r}")
    return f"{parts.scheme}://{parts.netloc}"


class TokenMiddleware:
    """Every HTTP request and WebSocket handshake must carry the token: `Authorization: Bearer TOKEN`
    or `?token=TOKEN` (how a page and its links pass it). Refused: HTTP 401, or a WebSocket closed
    before it opens (HTTP 403)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    def _given(self, scope) -> str | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].strip().decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        return dict(parse_qsl(query)).get("token")

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(PUBLIC_PATHS):
            return await self.app(scope, receive, send)
        given = self._given(scope)
        if given is not None and secrets.compare_digest(given.encode("utf-8", "replace"), self.token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "a valid token is required"})
            return
        body = json.dumps({"detail": "this server needs its token: open the page as /?token=..., or send "
                                     "'Authorization: Bearer ...'"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def http_protocol(header_timeout: float = HEADER_TIMEOUT):
    """uvicorn's HTTP protocol class (h11 or httptools, as uvicorn picks) with a header deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadlineProtocol(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self):
            asyncio.get_running_loop().call_later(header_timeout, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle):
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:  # closed, or now a WebSocket
                return
            if self.cycle is cycle and (cycle is None or cycle.response_complete):  # no request head since
                transport.close()

    return HeaderDeadlineProtocol


def websocket_protocol():
    """uvicorn's websockets (sans-I/O) protocol, telling a client why its message was too big; or
    "auto" with an older uvicorn that lacks it (such messages are then only closed with 1009)."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
        from websockets.exceptions import PayloadTooBig
        from websockets.frames import Frame, Opcode
    except ImportError:
        return "auto"

    class TooBigAnsweredProtocol(WebSocketsSansIOProtocol):
        # uvicorn closes the socket right after its close frame, while the rest of the oversized
        # message is still unread; the kernel then answers with a reset, and a client that has not
        # read the close frame yet loses it (and the error before it). Here the server half-closes
        # (FIN after the close frame) and discards what still arrives (websockets' parser does, after
        # its error) until the client hangs up, or `CLOSE_DRAIN_SECONDS` at most.
        draining = False

        def handle_parser_exception(self):
            if self.draining:
                return
            exc = self.conn.parser_exc
            if not (isinstance(exc, PayloadTooBig) and self.handshake_complete and not self.close_sent):
                super().handle_parser_exception()
                return
            error = {"type": "error", "code": "frame_too_large",
                     "message": f"{exc}; the connection closes (the limit is {self.config.ws_max_size} bytes "
                                "per message)"}
            self.transport.write(Frame(Opcode.TEXT, json.dumps(error).encode()).serialize(mask=False))
            close = self.conn.close_sent
            self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason})
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = self.draining = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            asyncio.get_running_loop().call_later(CLOSE_DRAIN_SECONDS, self.transport.close)

    return TooBigAnsweredProtocol
