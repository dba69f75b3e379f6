"""The web app of `atelier serve`: the page, a WebSocket per session, MJPEG, snapshots, metrics.

WebSocket `/ws` (query: `format=jpeg|png`, `quality=1..100`):
  in   binary: a JPEG, PNG or WebP frame (any size up to the limits; resized to the model's)
       text:   {"type": "settings", "prompt": "...", "guidance_scale": 1.5, ...}  (any live setting)
               {"type": "reset"} | {"type": "ping"} | {"type": "output", "format": "png", "quality": 90}
               {"type": "edit", "source": "...", "target": "...", "show_mask": false}: edit mode, each frame edited with the
               one-step method (needs the model's inverter); without prompts it ends edit mode
  out  binary: the output frame for the latest input frame
       text:   {"type": "hello", ...} on connect, {"type": "settings", "settings": {...}} after each
               change, {"type": "status", "fps": ..., "latency_ms": ...} about once a second,
               {"type": "error", "code": ..., "message": ...} for anything refused; the session goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI, HTTPException, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from atelier.errors import UserError
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

log = logging.getLogger("atelier.server")

STATIC = Path(__file__).parent / "static"
MAX_TEXT_MESSAGE = 64 * 1024
CLOSE_TRY_AGAIN_LATER = 1013
MESSAGE_TYPES = ("settings", "reset", "output", "ping", "edit")


def create_app(
    pipe_or_source="toyworld-turbo",
    *,
    max_sessions: int = 8,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    max_frame_side: int = MAX_FRAME_SIDE,
    engine_factory=None,
    **load_options,
) -> FastAPI:
    """The app for a loaded pipeline, or for anything `load_pipeline` takes (loaded here, now)."""
    from atelier.core.facts import model_name as _model_name
    from atelier.stream import StreamEngine

    if isinstance(pipe_or_source, (str, os.PathLike)):
        from atelier.models import load_pipeline

        pipe = load_pipeline(str(pipe_or_source), **load_options)
    else:
        pipe = pipe_or_source
    manager = SessionManager(pipe, max_sessions, max_frame_side, engine_factory)
    schema = StreamEngine.settings_schema(pipe)
    model = _model_name(pipe) or "model"
    try:
        from atelier.edit.one_step import default_inverter

        one_step = default_inverter(pipe)
    except UserError:
        one_step = None
    public_settings = {
        "one_step_edit": one_step,  # the built-in inverter the stream's edit mode uses, or None
        "model": model,
        "width": schema["width"]["default"],
        "height": schema["height"]["default"],
        "ip_adapter": bool(schema.get("ip_adapter", {}).get("default")),
        "settings": schema,
        "output_formats": list(OUTPUT_FORMATS),
        "limits": {"max_frame_bytes": max_frame_bytes, "max_frame_side": max_frame_side, "max_sessions": max_sessions},
    }

    @asynccontextmanager
    async def lifespan(app):
        manager.start()
        try:
            yield
        finally:
            manager.stop()

    app = FastAPI(title="atelier serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager = manager
    app.state.max_frame_bytes = max_frame_bytes
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def find(session_id: str) -> Session:
        session = manager.sessions.get(session_id)
        if session is None:
            raise HTTPException(404, f"no open session {session_id!r}")
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
    async def snapshot(session_id: str):
        session = find(session_id)
        if session.last is None:
            raise HTTPException(404, f"session {session_id} has no output frame yet")
        image, infotext = session.last
        data = await asyncio.to_thread(_png_with_parameters, image, infotext)
        headers = {"Content-Disposition": f'attachment; filename="atelier-{session_id}.png"', "Cache-Control": "no-store"}
        return Response(data, media_type="image/png", headers=headers)

    @app.get("/api/sessions/{session_id}/mjpeg")
    async def mjpeg(session_id: str):
        session = find(session_id)
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
        session.post({"type": "hello", "session": session.id, "model": model, "width": public_settings["width"],
                      "height": public_settings["height"], "format": fmt,
                      "snapshot": f"/api/sessions/{session.id}/snapshot.png",
                      "mjpeg": f"/api/sessions/{session.id}/mjpeg"})
        for exc in problems:
            session.error(exc.code, str(exc))
        sender = asyncio.create_task(_send_loop(websocket, session))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    if message.get("bytes") is not None:
                        check_frame(message["bytes"], max_frame_bytes, max_frame_side)
                        manager.submit_frame(session, message["bytes"])
                    elif message.get("text") is not None:
                        _on_text(manager, session, message["text"], schema)
                except ClientError as exc:
                    session.error(exc.code, str(exc))
        except Exception as exc:  # the client vanished mid-message, or the protocol broke
            log.info("session %s ended: %r", session.id, exc)
        finally:
            manager.close(session)
            sender.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await sender

    return app


async def _send_loop(websocket: WebSocket, session: Session) -> None:
    try:
        while True:
            item = await session.next_outgoing()
            if isinstance(item, bytes):
                await websocket.send_bytes(item)
            else:
                await websocket.send_text(json.dumps(item))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the client is gone; the receiving side closes the session
        log.info("session %s: sending failed: %r", session.id, exc)


def _on_text(manager: SessionManager, session: Session, text: str, schema: dict) -> None:
    if len(text) > MAX_TEXT_MESSAGE:
        raise ClientError("bad_message", f"text message is {len(text)} characters; the limit is {MAX_TEXT_MESSAGE}")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientError("bad_message", f"text messages must be JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(message, dict):
        raise ClientError("bad_message", 'text messages must be JSON objects, e.g. {"type": "settings", "prompt": "..."}')
    kind = message.get("type")
    if kind == "settings":
        changes = message["settings"] if isinstance(message.get("settings"), dict) else {
            k: v for k, v in message.items() if k != "type"}
        if not changes:
            raise ClientError("bad_settings", "the settings message changes nothing")
        fixed = sorted(k for k in changes if schema.get(k, {}).get("readOnly"))
        if fixed:
            raise ClientError("bad_settings", f"{', '.join(fixed)} cannot be changed: fixed by the model")
        manager.submit_command(session, "settings", changes)
    elif kind == "reset":
        manager.submit_command(session, "reset")
    elif kind == "output":
        fmt, quality = _output_options(message.get("format", session.output_format), message.get("quality", session.quality))
        manager.submit_command(session, "output", {"format": fmt, "quality": quality})
    elif kind == "edit":
        manager.submit_command(session, "edit", {"source": message.get("source"), "target": message.get("target"),
                                                 "show_mask": message.get("show_mask") is True})
    elif kind == "ping":
        session.post({"type": "pong", "t": message.get("t")})
    else:
        raise ClientError("unknown_type", f"unknown message type {kind!r}; known: {', '.join(MESSAGE_TYPES)}")


def _output_options(fmt, quality) -> tuple[str, int]:
    fmt = str(fmt).lower().replace("jpg", "jpeg")
    if fmt not in OUTPUT_FORMATS:
        raise ClientError("bad_message", f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    try:
        quality = int(quality)
    except (TypeError, ValueError):
        raise ClientError("bad_message", f"quality must be a whole number from 1 to 100, got {quality!r}") from None
    if not 1 <= quality <= 100:
        raise ClientError("bad_message", f"quality must be from 1 to 100, got {quality}")
    return fmt, quality


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


def make_server(app: FastAPI, log_level: str = "warning"):
    """A uvicorn server for `app`; run it with `server.run(sockets=[listen(host, port)])`.

    WebSocket messages up to 4x the frame limit reach the app, which answers an oversized frame
    with a JSON error; larger ones are closed by the protocol with code 1009 (message too big).
    """
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, ws_max_size=4 * app.state.max_frame_bytes,
                            timeout_graceful_shutdown=3, lifespan="on")
    return uvicorn.Server(config)
