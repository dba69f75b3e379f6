"""The web app of `atelier serve`: the page, a WebSocket per session, MJPEG, snapshots, metrics.

WebSocket `/ws` (query: `format=jpeg|png`, `quality=1..100`):
  in   binary: a JPEG, PNG or WebP frame (any size up to the limits; resized to the model's)
       text:   {"type": "settings", "prompt": "...", "guidance_scale": 1.5, ...}  (any live setting)
               {"type": "reset"} | {"type": "ping"} | {"type": "output", "format": "png", "quality": 90}
               {"type": "edit", "source": "...", "target": "...", "show_mask": false}: edit mode, each frame edited with the
               one-step method (needs the model's inverter); without prompts it ends edit mode
               {"type": "reference"}: the next binary message is the session's reference image (IP-Adapter image
               prompt; same limits as frames), not a frame. {"type": "settings", "reference": null} clears it,
               "reference": "frame" makes each input frame the reference, "ip_scale": 0.6 sets its scale
  out  binary: the output frame for the latest input frame
       text:   {"type": "hello", "session": ..., "key": ..., "snapshot": URL, "mjpeg": URL, ...} on connect,
               {"type": "settings", "settings": {...}} after each change, {"type": "status", "fps": ...,
               "latency_ms": ...} about once a second, {"type": "error", "code": ..., "message": ...} for
               anything refused; the session goes on. A message over the protocol's size limit gets the
               error, then the connection closes (1009); an idle session (no frame or command for
               `idle_timeout` seconds; pings do not count) gets "idle_timeout", then a close (1001).

A session's snapshot and MJPEG URLs carry its key (`?key=`), which only its own client is told.
Host names are checked on every request, the Origin of WebSocket handshakes against the server's
own and `allowed_origins`, and with `auth_token` every request but /static/ needs the token
(`Authorization: Bearer TOKEN` or `?token=TOKEN`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI, HTTPException, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from atelier.errors import UserError
from atelier.server.edit_mode import EditMode, edit_prompts
from atelier.server.security import (
    HEADER_TIMEOUT,
    LOOPBACK_HOSTS,
    TokenMiddleware,
    http_protocol,
    normal_origin,
    origin_allowed,
    websocket_protocol,
)
from atelier.server.sessions import (
    MAX_FRAME_BYTES,
    MAX_FRAME_SIDE,
    OUTPUT_FORMATS,
    ClientError,
    Session,
    SessionLimit,
    SessionManager,
    check_frame,
    encode_image,
)
from atelier.stream.settings import show, whole_number

log = logging.getLogger("atelier.server")

STATIC = Path(__file__).parent / "static"
MAX_TEXT_MESSAGE = 64 * 1024
IDLE_TIMEOUT = 120.0  # seconds without a frame or command before a session is closed
TINY_VAE_USES = ("both", "encode")  # what a tiny autoencoder does for the stream: encode and decode, or encode only
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
MESSAGE_TYPES = ("settings", "reset", "output", "ping", "edit", "reference")


class _Close:
    """An outbox item: close the WebSocket once everything before it is sent."""

    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


def create_app(
    pipe_or_source="toyworld-turbo",
    *,
    max_sessions: int = 8,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    max_frame_side: int = MAX_FRAME_SIDE,
    engine_factory=None,
    allowed_hosts: list[str] | None = None,
    allowed_origins: list[str] = (),
    auth_token: str | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    ip_adapter=None,
    ip_image_encoder=None,
    tiny_vae=None,
    tiny_vae_for: str = "both",
    **load_options,
) -> FastAPI:
    """The app for a loaded pipeline, or for anything `load_pipeline` takes (loaded here, now).

    allowed_hosts: Host names served (default: this machine's loopback names; "*" for any).
    allowed_origins: origins besides the server's own whose pages may open the WebSocket ("*": any).
    auth_token: when set, required on every request but /static/.
    idle_timeout: seconds without a frame or command after which a session is closed.
    ip_adapter / ip_image_encoder: the IP-Adapter for the sessions' reference images (a source as
      load_ip_adapter takes it; False: none). Default: the one already loaded in the pipeline, else for a built-in
      model its own adapter if there is one; without an adapter the page's reference slot is off.
    tiny_vae: the sessions' tiny autoencoder (TAESD) instead of the model's VAE: a loaded one, or a
      source as load_tiny_autoencoder takes it (loaded here, once, never downloaded); tiny_vae_for:
      "both" (it encodes and decodes the frames) or "encode" (the model's VAE still decodes them).
    """
    from atelier.core.facts import model_name as _model_name
    from atelier.stream import StreamEngine

    if not (isinstance(idle_timeout, (int, float)) and math.isfinite(idle_timeout) and idle_timeout > 0):
        raise UserError(f"idle_timeout must be a number of seconds above 0, got {idle_timeout!r}")
    if auth_token is not None and len(auth_token) < 8:
        raise UserError("the auth token must be at least 8 characters long")
    origins = frozenset(normal_origin(o) for o in allowed_origins)
    if isinstance(pipe_or_source, (str, os.PathLike)):
        from atelier.models import load_pipeline

        pipe = load_pipeline(str(pipe_or_source), **load_options)
    else:
        pipe = pipe_or_source
    model = _model_name(pipe) or "model"
    reference_note = _load_reference_adapter(pipe, model, ip_adapter, ip_image_encoder,
                                             load_options.get("allow_pickle", False))
    if isinstance(tiny_vae, (str, os.PathLike)):
        from atelier.models import load_tiny_autoencoder

        tiny_vae = load_tiny_autoencoder(tiny_vae, device=pipe.unet.device, dtype=pipe.unet.dtype, download=False)
    if tiny_vae_for not in TINY_VAE_USES:
        raise UserError(f"tiny_vae_for must be {' or '.join(TINY_VAE_USES)}, got {tiny_vae_for!r}")
    manager = SessionManager(pipe, max_sessions, max_frame_side, engine_factory, tiny_vae=tiny_vae,
                             tiny_vae_for=tiny_vae_for)
    schema = StreamEngine.settings_schema(pipe)
    try:
        from atelier.edit.one_step import default_inverter

        one_step = default_inverter(pipe)
    except UserError:
        one_step = None
    edit_mode = EditMode(pipe)
    public_settings = {
        "one_step_edit": one_step,  # the built-in inverter the stream's edit mode uses, or None
        "model": model,
        "width": schema["width"]["default"],
        "height": schema["height"]["default"],
        "ip_adapter": bool(schema.get("ip_adapter", {}).get("default")),
        "ip_adapter_note": reference_note,  # why reference images are off, or None
        "settings": schema,
        "output_formats": list(OUTPUT_FORMATS),
        "limits": {"max_frame_bytes": max_frame_bytes, "max_frame_side": max_frame_side, "max_sessions": max_sessions,
                   "idle_timeout_s": idle_timeout},
    }

    @asynccontextmanager
    async def lifespan(app):
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    app = FastAPI(title="atelier serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager
    app.state.max_frame_bytes = max_frame_bytes
    if auth_token is not None:
        app.add_middleware(TokenMiddleware, token=auth_token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS), www_redirect=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def find(session_id: str, key: str | None) -> Session:
        session = manager.find(session_id, key)
        if session is None:  # the same answer for a wrong key as for no session: ids reveal nothing
            raise HTTPException(404, f"no open session {show(session_id, 40)} with this key")
        return session

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        ok = manager.worker_alive
        body = {"status": "ok" if ok else "inference worker stopped", "model": model,
                "sessions": len(manager.sessions), "max_sessions": manager.max_sessions}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/api/settings")
    async def settings():
        return public_settings

    @app.get("/api/metrics")
    async def metrics():
        return {"model": model, **manager.metrics()}

    @app.get("/api/sessions/{session_id}/snapshot.png")
    async def snapshot(session_id: str, key: str | None = None):
        session = find(session_id, key)
        if session.last is None:
            raise HTTPException(404, f"session {session_id} has no output frame yet")
        image, infotext = session.last
        data = await asyncio.to_thread(_png_with_parameters, image, infotext)
        headers = {"Content-Disposition": f'attachment; filename="atelier-{session_id}.png"', "Cache-Control": "no-store"}
        return Response(data, media_type="image/png", headers=headers)

    @app.get("/api/sessions/{session_id}/mjpeg")
    async def mjpeg(session_id: str, key: str | None = None):
        session = find(session_id, key)
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        if session.last is not None:
            queue.put_nowait(await asyncio.to_thread(encode_image, session.last[0], "jpeg", session.quality))
        session.mjpeg_clients.add(queue)

        async def parts():
            try:
                while (jpeg := await queue.get()) is not None:
                    yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)) + jpeg + b"\r\n"
            finally:
                session.mjpeg_clients.discard(queue)

        return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers={"Cache-Control": "no-store"})

    @app.websocket("/ws")
    async def stream(websocket: WebSocket):
        origin = websocket.headers.get("origin")
        if not origin_allowed(origin, websocket.headers.get("host"), origins):
            log.warning("refused a WebSocket from origin %r (see --allowed-origin)", origin)
            await websocket.close(code=CLOSE_POLICY_VIOLATION)  # before accepting: HTTP 403
            return
        await websocket.accept()
        problems = []
        try:
            fmt, quality = _output_options(websocket.query_params.get("format", "jpeg"),
                                           websocket.query_params.get("quality", "90"))
        except ClientError as exc:
            problems.append(exc)
            fmt, quality = "jpeg", 90
        try:
            session = manager.open(asyncio.get_running_loop(), fmt, quality)
        except SessionLimit as exc:
            await websocket.send_text(json.dumps({"type": "error", "code": "server_full", "message": str(exc)}))
            await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason=str(exc)[:120])
            return
        private = f"/api/sessions/{session.id}/%s?key={session.key}"
        session.post({"type": "hello", "session": session.id, "key": session.key, "model": model,
                      "width": public_settings["width"], "height": public_settings["height"], "format": fmt,
                      "snapshot": private % "snapshot.png", "mjpeg": private % "mjpeg", "idle_timeout_s": idle_timeout})
        for exc in problems:
            session.error(exc.code, str(exc))
        tasks = [asyncio.create_task(_send_loop(websocket, session)),
                 asyncio.create_task(_close_when_idle(manager, session, idle_timeout))]
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    if message.get("bytes") is not None and session.expect_reference:
                        session.expect_reference = False
                        check_frame(message["bytes"], max_frame_bytes, max_frame_side, what="reference")
                        manager.submit_command(session, "reference", {"image": message["bytes"]})
                    elif message.get("bytes") is not None:
                        check_frame(message["bytes"], max_frame_bytes, max_frame_side)
                        manager.submit_frame(session, message["bytes"])
                    elif message.get("text") is not None:
                        _on_text(manager, session, message["text"], edit_mode)
                except ClientError as exc:
                    session.error(exc.code, str(exc))
                except Exception:  # a bug must cost one message, not the session
                    log.exception("session %s: a message failed", session.id)
                    session.error("internal", "the server failed on this message (see its log); the session goes on")
        except Exception as exc:  # the client vanished mid-message, or the protocol broke
            log.info("session %s ended: %r", session.id, exc)
        finally:
            manager.close(session)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(asyncio.CancelledError, Exception):
                    await task

    return app


async def _send_loop(websocket: WebSocket, session: Session) -> None:
    try:
        while True:
            item = await session.next_outgoing()
            if isinstance(item, bytes):
                await websocket.send_bytes(item)
            elif isinstance(item, _Close):
                await websocket.close(code=item.code, reason=item.reason)
                return
            else:
                try:
                    text = json.dumps(item, allow_nan=False)  # browsers' JSON.parse knows no Infinity
                except (ValueError, TypeError, RecursionError):
                    log.exception("session %s: a message could not be sent as JSON", session.id)
                    continue
                await websocket.send_text(text)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the client is gone; the receiving side closes the session
        log.info("session %s: sending failed: %r", session.id, exc)


async def _close_when_idle(manager: SessionManager, session: Session, timeout: float) -> None:
    """Close the session after `timeout` seconds without a frame or command; its slot is free at once."""
    while (idle := time.monotonic() - session.last_active) < timeout:
        await asyncio.sleep(timeout - idle)
    session.error("idle_timeout", f"no frames or settings for {timeout:g} s: the session is closed; "
                                  "reconnect to go on")
    session.outbox.append(_Close(CLOSE_GOING_AWAY, f"idle for {timeout:g} s"))
    session.wakeup.set()
    manager.close(session)


def _on_text(manager: SessionManager, session: Session, text: str, edit_mode: EditMode) -> None:
    if len(text) > MAX_TEXT_MESSAGE:
        raise ClientError("bad_message", f"text message is {len(text)} characters; the limit is {MAX_TEXT_MESSAGE}")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientError("bad_message", f"text messages must be JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise ClientError("bad_message", "the JSON message nests too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (4300 digits)
        raise ClientError("bad_message", f"the JSON message has a value out of range: {exc}") from None
    if not isinstance(message, dict):
        raise ClientError("bad_message", 'text messages must be JSON objects, e.g. {"type": "settings", "prompt": "..."}')
    kind = message.get("type")
    if kind == "settings":
        changes = message["settings"] if isinstance(message.get("settings"), dict) else {
            k: v for k, v in message.items() if k != "type"}
        if not changes:
            raise ClientError("bad_settings", "the settings message changes nothing")
        manager.submit_command(session, "settings", changes)
    elif kind == "reset":
        manager.submit_command(session, "reset")
    elif kind == "output":
        fmt, quality = _output_options(message.get("format", session.output_format), message.get("quality", session.quality))
        manager.submit_command(session, "output", {"format": fmt, "quality": quality})
    elif kind == "edit":
        prompts = edit_prompts(message)
        show_mask = message.get("show_mask") is True
        manager.submit_command(session, "processor", {"make": lambda: edit_mode.processor(prompts, show_mask),
                                                      "reply": "edit", "error": "bad_edit"})
    elif kind == "reference":
        session.expect_reference = True
    elif kind == "ping":
        session.post({"type": "pong", "t": _echo(message.get("t"))})
    else:
        raise ClientError("unknown_type", f"unknown message type {show(kind)}; known: {', '.join(MESSAGE_TYPES)}")


def _load_reference_adapter(pipe, model: str, source, image_encoder, allow_pickle: bool) -> str | None:
    """Load the IP-Adapter the sessions' reference images use; None when there is one, else why not
    (the note the page shows). A source given explicitly must load: its error stops the server."""
    from atelier.models import list_builtin_models
    from atelier.stream.image_prompt import load_adapter, loaded_adapters

    if source is False:
        return "reference images are off on this server (--no-ip-adapter)"
    if source is not None:
        load_adapter(pipe, source, image_encoder=image_encoder, allow_pickle=allow_pickle)
        return None
    if loaded_adapters(pipe.unet) is not None:
        return None
    if model not in {m["name"] for m in list_builtin_models()}:
        return "reference images need an IP-Adapter: start atelier serve with --ip-adapter SOURCE"
    try:
        load_adapter(pipe, None, image_encoder=image_encoder)  # the built-in model's own adapter
    except UserError as exc:
        log.info("no IP-Adapter for %s: %s", model, exc)
        return f"{model} has no IP-Adapter yet: start atelier serve with --ip-adapter SOURCE for reference images"
    return None


def _echo(t):
    """A ping's `t` as the pong may repeat it: a plain number or a short text, else None."""
    if isinstance(t, str) and len(t) <= 64:
        return t
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and abs(t) < 2**53:
        return t
    return None


def _output_options(fmt, quality) -> tuple[str, int]:
    if not isinstance(fmt, str) or fmt.lower().replace("jpg", "jpeg") not in OUTPUT_FORMATS:
        raise ClientError("bad_message", f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {show(fmt)}")
    if isinstance(quality, str) and quality.strip().isdigit() and len(quality) <= 3:  # from the query string
        quality = int(quality)
    try:
        quality = whole_number(quality, "quality", 1, 100)
    except UserError as exc:
        raise ClientError("bad_message", str(exc)) from None
    return fmt.lower().replace("jpg", "jpeg"), quality


def _png_with_parameters(image, infotext: str) -> bytes:
    """PNG bytes carrying A1111 `parameters` text, as `atelier.core.images.save_png` writes."""
    import io

    from PIL.PngImagePlugin import PngInfo

    from atelier.core.infotext import PARAMETERS_KEY

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- serving


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 = any free port), or a UserError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)  # connections wait in the backlog until the server starts accepting
    return sock


def make_server(app: FastAPI, log_level: str = "warning", header_timeout: float = HEADER_TIMEOUT):
    """A uvicorn server for `app`; run it with `server.run(sockets=[listen(host, port)])`.

    WebSocket messages up to 4x the frame limit reach the app, which answers an oversized frame
    with a JSON error; larger ones get the same error from the protocol layer, then a close (1009).
    A connection whose request headers are not complete within `header_timeout` seconds is closed.
    """
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, ws_max_size=4 * app.state.max_frame_bytes,
                            http=http_protocol(header_timeout), ws=websocket_protocol(),
                            timeout_graceful_shutdown=3, lifespan="on")
    return uvicorn.Server(config)
