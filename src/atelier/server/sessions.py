"""Sessions of `atelier serve`: one StreamEngine per client, a one-frame input slot, an outbox, and
the one inference worker thread that serves every session in turn.

Threads: the event loop owns the WebSockets and each session's outbox; the worker owns the engines
(engine calls are not thread-safe across sessions sharing a pipeline, and must not block the loop).
They meet in `SessionManager._lock`, which guards each session's input slot and pending commands,
and in `loop.call_soon_threadsafe`, by which the worker hands results back.

Edit mode (per session): an "edit" command with a source and a target prompt makes the session edit
each frame with the one-step method (SwiftEdit: the model's learned inverter, one generator call,
atelier.edit.one_step) instead of streaming img2img; an edit without prompts turns it off.

Input never queues up: a new frame replaces one not yet started (counted as dropped), and an output
not yet sent is replaced by a newer one. A slow client therefore sees fewer, fresh frames.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
import uuid
from collections import deque

from atelier.errors import UserError

log = logging.getLogger("atelier.server")

MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_FRAME_SIDE = 4096  # as for image files (atelier.core.facts.MAX_IMAGE_SIDE)
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


def _open_frame(data: bytes, max_side: int, load: bool):
    """`open_image` on a frame's bytes, its refusals as the client's error codes."""
    from atelier.core.images import ImageTooLarge, open_image

    try:
        return open_image(data, max_side=max_side, formats=FRAME_FORMATS, name="frame", load=load)
    except ImageTooLarge as exc:
        raise ClientError("frame_too_large", str(exc)) from None
    except UserError as exc:
        raise ClientError("bad_frame", f"{exc}; binary messages must be JPEG, PNG or WebP images") from None


def check_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES, max_side: int = MAX_FRAME_SIDE) -> None:
    """Refuse, cheaply and before any decoding, what cannot be a frame."""
    if len(data) > max_bytes:
        raise ClientError("frame_too_large", f"frame is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ClientError("bad_frame", "empty binary message; send a JPEG, PNG or WebP image")
    _open_frame(data, max_side, load=False)


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


class Session:
    """One client: its engine (made and used by the worker only), input slot and outbox."""

    def __init__(self, loop: asyncio.AbstractEventLoop, output_format: str = "jpeg", quality: int = 90):
        self.id = uuid.uuid4().hex[:12]
        self.loop = loop
        self.output_format = output_format
        self.quality = quality
        self.created = time.time()
        self.closed = False
        self.engine = None
        self.edit: tuple[str, str] | None = None  # (source, target) in edit mode; worker-owned
        self.show_mask = False  # edit mode: tint the edit mask red on the output
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

    def __init__(self, pipe, max_sessions: int = 8, max_frame_side: int = MAX_FRAME_SIDE, engine_factory=None):
        if max_sessions < 1:
            raise UserError(f"max_sessions must be at least 1, got {max_sessions}")
        self.pipe = pipe
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
        self._editor = None  # the one-step Editor shared by sessions in edit mode (worker-owned)

    def _default_engine(self):
        from atelier.stream import StreamEngine

        engine = StreamEngine(self.pipe)
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

    def submit_frame(self, session: Session, data: bytes) -> None:
        with self._lock:
            if session.closed:
                return
            if session._frame is not None:
                session.frames_dropped += 1
            session._frame = (data, time.monotonic())
            session.frames_in += 1
            self._schedule(session)

    def submit_command(self, session: Session, kind: str, args: dict | None = None) -> None:
        """Queue "settings" (engine.update(**args)), "reset", "output" or "edit" ({"source", "target"};
        empty prompts end edit mode) for the worker, in order."""
        with self._lock:
            if session.closed:
                return
            if len(session._commands) >= MAX_PENDING_COMMANDS:
                raise ClientError("busy", f"more than {MAX_PENDING_COMMANDS} commands waiting; slow down")
            session._commands.append((kind, args or {}))
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
            try:
                if kind == "settings":
                    settings = session.engine.update(**args)
                    self._send(session, "post", {"type": "settings", "settings": settings})
                elif kind == "reset":
                    session.engine.reset()
                elif kind == "output":
                    session.output_format = args.get("format", session.output_format)
                    session.quality = args.get("quality", session.quality)
                elif kind == "edit":
                    session.edit = self._edit_prompts(args)
                    session.show_mask = bool(args.get("show_mask", False))
                    edit = None if session.edit is None else {**dict(zip(("source", "target"), session.edit)),
                                                              "show_mask": session.show_mask}
                    self._send(session, "post", {"type": "edit", "edit": edit})
            except UserError as exc:
                self._send(session, "error", "bad_edit" if kind == "edit" else "bad_settings", str(exc))
        if frame is None:
            return
        data, received = frame
        try:
            image = decode_frame(data, self.max_frame_side)
            if session.edit is not None:
                out, infotext = self._edit_frame(session, image)
            else:
                out, infotext = session.engine(image), None
        except ClientError as exc:
            self._send(session, "error", exc.code, str(exc))
            return
        except UserError as exc:
            self._send(session, "error", "bad_frame", str(exc))
            return
        session.last = (out, infotext or session.engine.infotext())
        payload = encode_image(out, session.output_format, session.quality)
        jpeg = None
        if session.mjpeg_clients:
            jpeg = payload if session.output_format == "jpeg" else encode_image(out, "jpeg", session.quality)
        self.frames_total += 1
        self._send(session, "deliver", payload, jpeg, received)

    # Edit mode ---------------------------------------------------------------------------

    def _edit_prompts(self, args: dict) -> tuple[str, str] | None:
        from atelier.stream.engine import MAX_PROMPT_CHARS

        source, target = args.get("source"), args.get("target")
        if not source and not target:
            return None
        for name, text in (("source", source), ("target", target)):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"edit mode needs a {name} prompt (send both, or neither to stop editing)")
            if len(text) > MAX_PROMPT_CHARS:
                raise UserError(f"the {name} prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        self._edit_engine().one_step()  # no inverter for this model: refused now, not on every frame
        return source, target

    def _edit_engine(self):
        if self._editor is None:
            from atelier.edit.methods import Editor

            self._editor = Editor(self.pipe)
        return self._editor

    def _edit_frame(self, session: Session, image):
        """One frame through the one-step edit, at the stream's size; (image, infotext)."""
        from atelier.edit.methods import EditSettings
        from atelier.core.facts import model_name as _model_name

        engine = session.engine
        if image.size != (engine.width, engine.height):
            image = image.resize((engine.width, engine.height), 3)  # bicubic
        source, target = session.edit
        seed = engine.settings().get("seed", 0)
        result = self._edit_engine().edit(image, source, target, EditSettings(method="one-step", seed=seed))
        out = result.image
        if session.show_mask and result.mask is not None:
            from PIL import Image

            red = Image.new("RGB", out.size, (255, 0, 0))
            out = Image.composite(red, out, result.mask.point(lambda v: v * 45 // 100))  # 45 % red tint
        return out, result.parameters(source, target, _model_name(self.pipe))

    # Metrics -------------------------------------------------------------------------------

    def metrics(self) -> dict:
        sessions = [s.metrics() for s in list(self.sessions.values())]
        return {
            "sessions": sessions,
            "session_count": len(sessions),
            "max_sessions": self.max_sessions,
            "frames_total": self.frames_total,
            "frames_dropped_total": sum(s["frames_dropped"] for s in sessions),
            "fps_total": round(sum(s["fps"] for s in sessions), 2),
            "worker_alive": self.worker_alive,
            "uptime_s": round(time.time() - self.started, 1),
        }
