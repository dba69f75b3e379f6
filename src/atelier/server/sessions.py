"""Sessions of `atelier serve`: one StreamEngine per client, a one-frame input slot, an outbox, and
the one inference worker thread that serves every session in turn.

Threads: the event loop owns the WebSockets and each session's outbox; the worker owns the engines
(engine calls are not thread-safe across sessions sharing a pipeline, and must not block the loop).
They meet in `SessionManager._lock`, which guards each session's input slot and pending commands,
and in `loop.call_soon_threadsafe`, by which the worker hands results back.

Each session turns frames into outputs with its engine (img2img), or with a frame processor handed
to it by a "processor" command (edit mode is one: atelier.server.edit_mode); the manager knows no
more of processors than `FrameProcessor` says.

A session's snapshot and MJPEG stream are private: they need the session's `key`, an unguessable
token only its own WebSocket client is told.

Input never queues up: a new frame replaces one not yet started (counted as dropped), and an output
not yet sent is replaced by a newer one. A slow client therefore sees fewer, fresh frames.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import threading
import time
from collections import deque
from typing import Callable, Protocol

from atelier.core.facts import MAX_IMAGE_SIDE
from atelier.errors import UserError

log = logging.getLogger("atelier.server")

MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_FRAME_SIDE = MAX_IMAGE_SIDE  # the limit for image files applies to frames too
FRAME_FORMATS = ("JPEG", "PNG", "WEBP")
OUTPUT_FORMATS = ("jpeg", "png")
MAX_PENDING_COMMANDS = 32
MAX_OUTBOX = 64
STATUS_INTERVAL = 1.0  # seconds between status messages


class SessionLimit(UserError):
    """The server already has --max-sessions sessions."""


class ClientError(UserError):
    """A client's mistake, reported to that client as {"type": "error", "code": ..., "message": ...}."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- frames


def _open_frame(data: bytes, max_side: int, load: bool, what: str = "frame"):
    """`open_image` on a frame's (or reference image's) bytes, its refusals as the client's error codes."""
    from atelier.core.images import ImageTooLarge, open_image

    try:
        return open_image(data, max_side=max_side, formats=FRAME_FORMATS, name=what, load=load)
    except ImageTooLarge as exc:
        raise ClientError(f"{what}_too_large", str(exc)) from None
    except UserError as exc:
        raise ClientError(f"bad_{what}", f"{exc}; binary messages must be JPEG, PNG or WebP images") from None


def check_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES, max_side: int = MAX_FRAME_SIDE, what: str = "frame") -> None:
    """Refuse, cheaply and before any decoding, what cannot be a frame (`what`: "frame" or "reference",
    which also names the error codes: bad_frame, frame_too_large, bad_reference, reference_too_large)."""
    if len(data) > max_bytes:
        raise ClientError(f"{what}_too_large", f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ClientError(f"bad_{what}", "empty binary message; send a JPEG, PNG or WebP image")
    _open_frame(data, max_side, load=False, what=what)


def decode_frame(data: bytes, max_side: int = MAX_FRAME_SIDE):
    """The RGB pixels of a frame that passed `check_frame`; corrupt or truncated data is a ClientError."""
    return _open_frame(data, max_side, load=True).convert("RGB")


def encode_image(image, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- sessions


class FrameProcessor(Protocol):
    """What a session runs on each frame instead of plain img2img (called on the worker thread)."""

    def __call__(self, engine, image) -> tuple:
        """(output PIL image, its A1111 infotext) for an RGB frame; `engine` is the session's."""

    def describe(self) -> dict:
        """What the client is told about this processor (JSON-able)."""


def stream_frame(engine, image) -> tuple:
    """The default: the session's StreamEngine, img2img."""
    return engine(image), engine.infotext()


class Session:
    """One client: its engine (made and used by the worker only), input slot and outbox."""

    def __init__(self, loop: asyncio.AbstractEventLoop, output_format: str = "jpeg", quality: int = 90):
        self.id = secrets.token_hex(6)
        self.key = secrets.token_urlsafe(24)  # for the snapshot and MJPEG URLs; only the client knows it
        self.loop = loop
        self.output_format = output_format
        self.quality = quality
        self.created = time.time()
        self.last_active = time.monotonic()  # the last frame or command from the client
        self.closed = False
        self.engine = None  # worker-owned, as is the processor
        self.processor: FrameProcessor | None = None  # None: `stream_frame`
        self.expect_reference = False  # loop side: the next binary message is a reference image, not a frame
        # Guarded by the manager's lock.
        self._frame: tuple[bytes, float] | None = None
        self._commands: list[tuple[str, dict]] = []
        self._queued = False
        # Read by the loop, replaced whole by the worker: (PIL image, infotext) of the last output.
        self.last: tuple | None = None
        self.mjpeg_clients: set[asyncio.Queue] = set()
        # Event-loop side.
        self.outbox: deque = deque()
        self.wakeup = asyncio.Event()
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0  # inputs replaced before the worker reached them
        self.outputs_dropped = 0  # outputs replaced before the client took them
        self.errors = 0
        self.latency = None  # seconds, moving average, frame received -> output ready
        self._out_times: deque = deque(maxlen=120)
        self._last_status = 0.0

    # Loop side -----------------------------------------------------------------------------

    def post(self, message: dict) -> None:
        """Queue a JSON message for the client (the oldest unsent message goes when too many wait)."""
        if self.closed:
            return
        if message.get("type") == "error":
            self.errors += 1
        if len(self.outbox) >= MAX_OUTBOX:
            for i, item in enumerate(self.outbox):
                if isinstance(item, dict):
                    del self.outbox[i]
                    break
        self.outbox.append(message)
        self.wakeup.set()

    def error(self, code: str, message: str) -> None:
        self.post({"type": "error", "code": code, "message": message})

    def deliver(self, payload: bytes, jpeg: bytes | None, received: float) -> None:
        """An output frame from the worker (called on the loop)."""
        if self.closed:
            return
        now = time.monotonic()
        self.frames_out += 1
        self._out_times.append(now)
        latency = now - received
        self.latency = latency if self.latency is None else 0.8 * self.latency + 0.2 * latency
        if now - self._last_status >= STATUS_INTERVAL:
            self._last_status = now
            self.post({"type": "status", **self.metrics()})
        for i, item in enumerate(self.outbox):
            if isinstance(item, bytes):
                del self.outbox[i]
                self.outputs_dropped += 1
                break
        self.outbox.append(payload)
        self.wakeup.set()
        if jpeg is not None:
            for queue in self.mjpeg_clients:
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(jpeg)

    async def next_outgoing(self):
        """The next JSON message (dict) or output frame (bytes) to send, in order."""
        while not self.outbox:
            self.wakeup.clear()
            await self.wakeup.wait()
        return self.outbox.popleft()

    def fps(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._out_times if now - t <= 2.0]
        if len(recent) < 2:
            return 0.0
        return round((len(recent) - 1) / max(now - recent[0], 1e-6), 2)

    def key_matches(self, key: str | None) -> bool:
        return key is not None and secrets.compare_digest(key.encode(), self.key.encode())

    def metrics(self) -> dict:
        return {
            "session": self.id,
            "fps": self.fps(),
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 1),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_dropped": self.frames_dropped,
            "outputs_dropped": self.outputs_dropped,
            "errors": self.errors,
            "mjpeg_clients": len(self.mjpeg_clients),
            "age_s": round(time.time() - self.created, 1),
        }


class SessionManager:
    """All sessions of one server and the inference worker that serves them round-robin."""

    def __init__(self, pipe, max_sessions: int = 8, max_frame_side: int = MAX_FRAME_SIDE, engine_factory=None,
                 tiny_vae=None, tiny_vae_for: str = "both"):
        if max_sessions < 1:
            raise UserError(f"max_sessions must be at least 1, got {max_sessions}")
        self.pipe = pipe
        self.tiny_vae = tiny_vae  # a loaded tiny autoencoder every default engine shares, or None
        self.tiny_vae_for = tiny_vae_for  # "both" (encode and decode) or "encode"
        self.max_sessions = max_sessions
        self.max_frame_side = max_frame_side
        self.engine_factory = engine_factory or self._default_engine
        self.sessions: dict[str, Session] = {}
        self.frames_total = 0
        self.started = time.time()
        self._lock = threading.Condition()
        self._ready: deque[Session] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _default_engine(self):
        from atelier.stream import StreamEngine

        if self.tiny_vae_for == "encode":
            engine = StreamEngine(self.pipe, vae_encoder=self.tiny_vae)
        else:
            engine = StreamEngine(self.pipe, vae=self.tiny_vae)
        engine.prepare("")
        return engine

    # Lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="atelier-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def open(self, loop, output_format: str = "jpeg", quality: int = 90) -> Session:
        with self._lock:
            if len(self.sessions) >= self.max_sessions:
                raise SessionLimit(f"server full: {self.max_sessions} sessions already open (--max-sessions)")
            session = Session(loop, output_format, quality)
            self.sessions[session.id] = session
            self._schedule(session)  # the worker makes its engine
        return session

    def close(self, session: Session) -> None:
        with self._lock:
            session.closed = True
            session._frame = None
            session._commands.clear()
            self.sessions.pop(session.id, None)
        for queue in list(session.mjpeg_clients):  # end the MJPEG streams
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    # Input (from the loop) -----------------------------------------------------------------

    def find(self, session_id: str, key: str | None) -> Session | None:
        """The open session with this id, if `key` is its key."""
        session = self.sessions.get(session_id)
        return session if session is not None and session.key_matches(key) else None

    def submit_frame(self, session: Session, data: bytes) -> None:
        with self._lock:
            if session.closed:
                return
            if session._frame is not None:
                session.frames_dropped += 1
            session._frame = (data, time.monotonic())
            session.last_active = session._frame[1]
            session.frames_in += 1
            self._schedule(session)

    def submit_command(self, session: Session, kind: str, args: dict | None = None) -> None:
        """Queue for the worker, in order: "settings" (engine.update(**args)), "reference" ({"image": bytes}:
        engine.update(reference=...)), "reset", "output" ({"format", "quality"}) or "processor" ({"make": a
        function run on the worker that returns a
        FrameProcessor, or None for plain img2img, or raises a UserError; "reply": the type of the message
        describing the result; "error": the error code of a refusal})."""
        with self._lock:
            if session.closed:
                return
            if len(session._commands) >= MAX_PENDING_COMMANDS:
                raise ClientError("busy", f"more than {MAX_PENDING_COMMANDS} commands waiting; slow down")
            session._commands.append((kind, args or {}))
            session.last_active = time.monotonic()
            self._schedule(session)

    def _schedule(self, session: Session) -> None:
        if not session._queued:
            session._queued = True
            self._ready.append(session)
            self._lock.notify()

    # The worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                session = self._ready.popleft()
                session._queued = False
                if session.closed:
                    continue
                frame, session._frame = session._frame, None
                commands, session._commands = session._commands, []
            try:
                self._serve(session, commands, frame)
            except Exception:  # a bug must cost one frame, not the worker
                log.exception("session %s: unexpected error", session.id)
                self._send(session, "error", "internal", "the server failed on this frame (see its log); the session goes on")

    def _send(self, session: Session, method: str, *args) -> None:
        try:
            session.loop.call_soon_threadsafe(getattr(session, method), *args)
        except RuntimeError:  # the event loop has closed: the server is stopping
            pass

    def _serve(self, session: Session, commands: list, frame) -> None:
        if session.engine is None:
            session.engine = self.engine_factory()
            self._send(session, "post", {"type": "settings", "settings": session.engine.settings()})
        for kind, args in commands:
            code = {"processor": args.get("error"), "reference": "bad_reference"}.get(kind) or "bad_settings"
            try:
                self._command(session, kind, args)
            except UserError as exc:
                self._send(session, "error", code, str(exc))
            except Exception:  # a bug must cost one command, not the session
                log.exception("session %s: %s command failed", session.id, kind)
                self._send(session, "error", "internal", f"the server failed on this {kind} message (see its log); "
                                                         "nothing changed and the session goes on")
        if frame is None:
            return
        data, received = frame
        try:
            image = decode_frame(data, self.max_frame_side)
            out, infotext = (session.processor or stream_frame)(session.engine, image)
        except ClientError as exc:
            self._send(session, "error", exc.code, str(exc))
            return
        except UserError as exc:
            self._send(session, "error", "bad_frame", str(exc))
            return
        session.last = (out, infotext)
        payload = encode_image(out, session.output_format, session.quality)
        jpeg = None
        if session.mjpeg_clients:
            jpeg = payload if session.output_format == "jpeg" else encode_image(out, "jpeg", session.quality)
        self.frames_total += 1
        self._send(session, "deliver", payload, jpeg, received)

    def _command(self, session: Session, kind: str, args: dict) -> None:
        if kind in ("settings", "reference"):
            changes = {"reference": args["image"]} if kind == "reference" else args
            settings = session.engine.update(**changes)
            self._send(session, "post", {"type": "settings", "settings": settings})
        elif kind == "reset":
            session.engine.reset()
        elif kind == "output":
            session.output_format = args.get("format", session.output_format)
            session.quality = args.get("quality", session.quality)
        elif kind == "processor":
            make: Callable = args["make"]
            session.processor = make()
            reply = args.get("reply", "processor")
            self._send(session, "post", {"type": reply, reply: None if session.processor is None
                                         else session.processor.describe()})
        else:
            raise ValueError(f"unknown command {kind!r}")

    # Metrics -------------------------------------------------------------------------------

    def metrics(self) -> dict:
        """Counts and totals over every session; no session ids (they are each client's own business)."""
        sessions = [s.metrics() for s in list(self.sessions.values())]
        latencies = [s["latency_ms"] for s in sessions if s["latency_ms"] is not None]
        return {
            "session_count": len(sessions),
            "max_sessions": self.max_sessions,
            "frames_total": self.frames_total,
            "frames_dropped_total": sum(s["frames_dropped"] for s in sessions),
            "fps_total": round(sum(s["fps"] for s in sessions), 2),
            "latency_ms_mean": round(sum(latencies) / len(latencies), 1) if latencies else None,
            "worker_alive": self.worker_alive,
            "uptime_s": round(time.time() - self.started, 1),
        }
