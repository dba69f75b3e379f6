"""`atelier serve`: a real uvicorn server on 127.0.0.1 at a free port, real WebSocket clients.

Frames travel as PNG (format=png) so outputs can be compared exactly with a StreamEngine run
in this process on the same frames.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import suppress

import numpy as np
import pytest
import websockets
from PIL import Image

from atelier.errors import UserError
from atelier.server.app import create_app, listen, make_server

PROMPT_A = "a large red circle at the top left and a small blue square in the center"
PROMPT_B = "a small green triangle on the right"


@pytest.fixture(scope="module")
def pipe():
    from atelier.models import load_pipeline

    return load_pipeline("toyworld-turbo")


@pytest.fixture(scope="module")
def frames():
    import random

    from atelier.toyworld import render_pil, sample_scene

    rng = random.Random(7)
    return [render_pil(sample_scene(rng)) for _ in range(4)]


class RunningServer:
    """A uvicorn server in a thread, on a port the OS picked; stopped on exit."""

    def __init__(self, app, **server_options):
        self.app = app
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = make_server(app, **server_options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "server did not stop"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, query: str = "format=png") -> str:
        return f"ws://127.0.0.1:{self.port}/ws?{query}"

    def get(self, path: str, headers: dict | None = None):
        request = urllib.request.Request(self.http + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            return response.status, response.headers, body

    def get_json(self, path: str):
        return json.loads(self.get(path)[2])

    def session_metrics(self, session_id: str) -> dict:
        """A session's own figures (no public endpoint lists sessions)."""
        return self.app.state.manager.sessions[session_id].metrics()

    def wait_sessions(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.app.state.manager.sessions) != n:
            assert time.monotonic() < deadline, f"expected {n} open sessions"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(pipe):
    with RunningServer(create_app(pipe, max_sessions=8)) as running:
        yield running


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class Client:
    """One WebSocket session; JSON messages are kept in `messages` as they pass."""

    def __init__(self, ws):
        self.ws = ws
        self.messages: list[dict] = []
        self.session = None
        self.hello = None

    @classmethod
    async def open(cls, url: str, **options) -> "Client":
        client = cls(await websockets.connect(url, **options))
        client.hello = hello = await client.next_message("hello")
        client.session = hello["session"]
        await client.next_message("settings")  # the engine is ready
        return client

    async def _recv(self, timeout: float):
        item = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(item, str):
            item = json.loads(item)
            self.messages.append(item)
        return item

    async def next_frame(self, timeout: float = 30) -> np.ndarray:
        while True:
            item = await self._recv(timeout)
            if isinstance(item, bytes):
                return pixels(item)

    async def next_message(self, kind: str, timeout: float = 30) -> dict:
        while True:
            item = await self._recv(timeout)
            if isinstance(item, dict) and item["type"] == kind:
                return item

    async def settings(self, **changes) -> dict:
        await self.ws.send(json.dumps({"type": "settings", **changes}))
        return (await self.next_message("settings"))["settings"]

    async def frame(self, image: Image.Image) -> np.ndarray:
        await self.ws.send(png(image))
        return await self.next_frame()

    async def close(self):
        await self.ws.close()


def alone(pipe, prompt: str, frames) -> list[np.ndarray]:
    """What one StreamEngine makes of `frames` with `prompt`, outside any server."""
    from atelier.stream import StreamEngine

    engine = StreamEngine(pipe)
    engine.prepare(prompt)
    return [np.asarray(engine(f)) for f in frames]


# ---------------------------------------------------------------------------------------------- HTTP


def test_health_settings_page(server):
    status, _, body = server.get("/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["model"] == "toyworld-turbo"

    settings = server.get_json("/api/settings")
    assert (settings["width"], settings["height"]) == (64, 64)
    assert settings["ip_adapter"] is True and settings["ip_adapter_note"] is None  # toyworld-turbo's own toyworld-turbo-ip
    assert settings["one_step_edit"] == "toyworld-inverter"
    for key in ("prompt", "guidance_scale", "delta", "seed", "strength", "blend_prompt", "blend"):
        assert key in settings["settings"], key
    assert settings["settings"]["guidance_scale"]["maximum"] > settings["settings"]["guidance_scale"]["minimum"]

    status, headers, page = server.get("/")
    assert status == 200 and b"/static/app.js" in page and headers["content-type"].startswith("text/html")
    for name in ("app.js", "style.css"):
        assert server.get(f"/static/{name}")[0] == 200


def test_unknown_session_is_404(server):
    for path in ("/api/sessions/nope/snapshot.png", "/api/sessions/nope/mjpeg"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            server.get(path)
        assert exc.value.code == 404
        assert "no open session" in json.loads(exc.value.read())["detail"]


def http_status(server, path: str, headers: dict | None = None) -> int:
    try:
        return server.get(path, headers)[0]
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sessions_are_private(server, frames):
    """Only a session's own client learns its key; without it, its snapshot and MJPEG do not exist."""
    async def run():
        client = await Client.open(server.ws())
        await client.frame(frames[0])
        metrics = await asyncio.to_thread(server.get, "/api/metrics")
        health = await asyncio.to_thread(server.get, "/health")
        base = f"/api/sessions/{client.session}"
        guesses = [f"{base}/snapshot.png", f"{base}/mjpeg", f"{base}/snapshot.png?key=",
                   f"{base}/snapshot.png?key={client.hello['key'][:-1]}", f"{base}/mjpeg?key=guess"]
        refused = [await asyncio.to_thread(http_status, server, path) for path in guesses]
        status, headers, snapshot = await asyncio.to_thread(server.get, client.hello["snapshot"])
        await client.close()
        return client, metrics, health, refused, status, snapshot

    client, metrics, health, refused, status, snapshot = asyncio.run(run())
    assert client.session.encode() not in metrics[2] + health[2], "a public endpoint names the session"
    assert json.loads(metrics[2])["session_count"] == 1
    assert refused == [404] * len(refused)
    assert len(client.hello["key"]) >= 32
    assert client.hello["snapshot"] == f"/api/sessions/{client.session}/snapshot.png?key={client.hello['key']}"
    assert client.hello["mjpeg"] == f"/api/sessions/{client.session}/mjpeg?key={client.hello['key']}"
    assert status == 200 and Image.open(io.BytesIO(snapshot)).size == (64, 64)
    server.wait_sessions(0)


# ---------------------------------------------------------------------------------------------- sessions


def test_two_sessions_never_mix(server, pipe, frames):
    expected_a = alone(pipe, PROMPT_A, frames)
    expected_b = alone(pipe, PROMPT_B, frames)

    async def run():
        a, b = await Client.open(server.ws()), await Client.open(server.ws())
        assert (await a.settings(prompt=PROMPT_A))["prompt"] == PROMPT_A
        assert (await b.settings(prompt=PROMPT_B))["prompt"] == PROMPT_B
        got_a, got_b = [], []
        for image in frames:  # interleaved, both in flight at once
            await a.ws.send(png(image))
            await b.ws.send(png(image))
            got_a.append(await a.next_frame())
            got_b.append(await b.next_frame())
        await a.close()
        await b.close()
        return got_a, got_b

    got_a, got_b = asyncio.run(run())
    for i in range(len(frames)):
        assert np.array_equal(got_a[i], expected_a[i]), f"session A frame {i} is not what its prompt gives alone"
        assert np.array_equal(got_b[i], expected_b[i]), f"session B frame {i} is not what its prompt gives alone"
        assert not np.array_equal(got_a[i], got_b[i])
    server.wait_sessions(0)


def test_bad_input_gets_an_error_and_the_session_goes_on(server, frames):
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, format="PNG")  # a few KB that would decode to 25 Mpx
    good = png(frames[0])
    jpeg = io.BytesIO()
    frames[0].save(jpeg, format="JPEG")
    cases = [
        (b"this is not an image", "bad_frame"),
        (b"", "bad_frame"),
        (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "bad_frame"),  # truncated: fails while decoding
        (huge.getvalue(), "frame_too_large"),
        (b"\x89PNG" + bytes(9 * 1024 * 1024), "frame_too_large"),
        ("not json", "bad_message"),
        ("[1, 2]", "bad_message"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"prompt": "no type"}), "unknown_type"),
        (json.dumps({"type": "settings", "guidance_scale": "high"}), "bad_settings"),
        (json.dumps({"type": "settings", "seed": -1}), "bad_settings"),
        (json.dumps({"type": "settings", "colour": "red"}), "bad_settings"),
        (json.dumps({"type": "settings", "width": 128}), "bad_settings"),
        (json.dumps({"type": "output", "format": "gif"}), "bad_message"),
        # each of these used to end the session without a word
        ('{"type": "output", "quality": Infinity}', "bad_message"),  # int(inf): OverflowError
        ('{"type": "output", "quality": 1e400}', "bad_message"),
        ('{"type": "output", "quality": NaN}', "bad_message"),
        ('{"type": "output", "format": ["png"]}', "bad_message"),
        ('{"type": "settings", "seed": ' + "7" * 5000 + "}", "bad_message"),  # past Python's int digit limit
        ("[" * 30000 + "]" * 30000, "bad_message"),  # RecursionError in json.loads
        ('{"type": "settings", "guidance_scale": Infinity}', "bad_settings"),
        (json.dumps({"type": "settings", "prompt": "(" * 600}), "bad_settings"),  # RecursionError in the parser
        (json.dumps({"type": "settings", "seed": 10**4000}), "bad_settings"),
        (json.dumps({"type": "edit", "source": "a red circle", "target": "[" * 600}), "bad_edit"),
        (json.dumps({"type": "edit", "source": "a red circle"}), "bad_edit"),
        (json.dumps({"type": "x" * 10000}), "unknown_type"),
        (json.dumps({"type": "settings", "self": 1}), "bad_settings"),  # not update()'s own argument
    ]

    async def run():
        client = await Client.open(server.ws())
        before = await client.settings(prompt=PROMPT_A, guidance_scale=2.0)
        first = await client.frame(frames[0])
        for message, code in cases:
            await client.ws.send(message)
            error = await client.next_message("error")
            assert error["code"] == code, (message[:40], error)
            assert error["message"] and len(error["message"]) < 500
            # ... and the session still answers
            assert (await client.frame(frames[1])).shape == (64, 64, 3)
        after = await client.settings(delta=1.0)
        await client.ws.send(good)
        await client.next_frame()
        await client.close()
        return before, after, first

    before, after, first = asyncio.run(run())
    assert after["guidance_scale"] == before["guidance_scale"] == 2.0  # refused changes changed nothing
    assert after["seed"] == before["seed"]
    assert first.shape == (64, 64, 3)
    server.wait_sessions(0)


def test_a_refused_prompt_changes_nothing_in_the_session(server, frames):
    """The prompt is stored only once it encodes: the echo, the frames and the snapshot agree."""
    async def run():
        client = await Client.open(server.ws())
        await client.settings(prompt=PROMPT_A, seed=3)
        first = await client.frame(frames[0])
        await client.ws.send(json.dumps({"type": "settings", "prompt": "(" * 600 + "x", "seed": 4}))
        error = await client.next_message("error")
        settings = await client.settings(negative_prompt="a small green triangle", cfg_type="full", guidance_scale=1.5)
        blended = await client.settings(blend_prompt=PROMPT_B, blend=0.0)
        await client.settings(guidance_scale=1.0)
        again = await client.frame(frames[0])
        snapshot = (await asyncio.to_thread(server.get, client.hello["snapshot"]))[2]
        await client.close()
        return first, again, error, settings, blended, snapshot, client.messages

    first, again, error, settings, blended, snapshot, messages = asyncio.run(run())
    from atelier.generate.metadata import parse_parameters

    assert error["code"] == "bad_settings" and "nests brackets" in error["message"]
    assert settings["prompt"] == blended["prompt"] == PROMPT_A and settings["seed"] == 3
    assert not [m for m in messages if m["type"] == "error" and m["code"] == "internal"]
    assert np.array_equal(first, again)
    assert parse_parameters(Image.open(io.BytesIO(snapshot)).info["parameters"])["Prompt"] == PROMPT_A
    server.wait_sessions(0)


def test_ping_echo_is_plain_json(server):
    async def run():
        client = await Client.open(server.ws())
        replies = []
        for t in (1.5, "abc", [[[1]]], "x" * 1000, 10**30):
            await client.ws.send(json.dumps({"type": "ping", "t": t}))
            replies.append(await client.next_message("pong"))
        await client.ws.send('{"type": "ping", "t": Infinity}')
        replies.append(await client.next_message("pong"))  # JSON.parse in a browser knows no Infinity
        await client.close()
        return [r["t"] for r in replies]

    assert asyncio.run(run()) == [1.5, "abc", None, None, None, None]
    server.wait_sessions(0)


class Negative:
    """A frame processor: the input's negative, whatever the engine would make of it."""

    def __call__(self, engine, image):
        from PIL import ImageOps

        return ImageOps.invert(image.resize((engine.width, engine.height))), "negative of the input"

    def describe(self) -> dict:
        return {"name": "negative"}


def test_a_session_runs_any_frame_processor_it_is_handed(server, frames):
    """Edit mode is one such processor; the session manager knows only the FrameProcessor protocol."""
    def hand(client, make):
        session = server.app.state.manager.sessions[client.session]
        server.app.state.manager.submit_command(session, "processor", {"make": make, "reply": "mode", "error": "bad_mode"})

    def refuse():
        raise UserError("no such mode")

    async def run():
        client = await Client.open(server.ws())
        streamed = await client.frame(frames[0])
        await asyncio.to_thread(hand, client, Negative)
        described = await client.next_message("mode")
        negative = await client.frame(frames[0])
        snapshot = (await asyncio.to_thread(server.get, client.hello["snapshot"]))[2]
        await asyncio.to_thread(hand, client, refuse)
        refused = await client.next_message("error")
        still = await client.frame(frames[0])
        await asyncio.to_thread(hand, client, lambda: None)
        ended = await client.next_message("mode")
        back = await client.frame(frames[0])
        await client.close()
        return streamed, described, negative, snapshot, refused, still, ended, back

    streamed, described, negative, snapshot, refused, still, ended, back = asyncio.run(run())
    assert described["mode"] == {"name": "negative"} and ended["mode"] is None
    assert np.array_equal(negative, 255 - np.asarray(frames[0].convert("RGB")))
    assert Image.open(io.BytesIO(snapshot)).info["parameters"] == "negative of the input"
    assert refused["code"] == "bad_mode" and refused["message"] == "no such mode" and np.array_equal(still, negative)
    assert back.shape == streamed.shape and not np.array_equal(back, negative)
    server.wait_sessions(0)


def test_eight_sessions_at_once_and_the_ninth_refused(server, frames):
    server.wait_sessions(0)

    async def stream(i: int):
        client = await Client.open(server.ws())
        await client.settings(prompt=PROMPT_A if i % 2 else PROMPT_B, seed=i)
        outputs = [await client.frame(frames[(i + k) % len(frames)]) for k in range(3)]
        return client, outputs

    async def run():
        results = await asyncio.gather(*(stream(i) for i in range(8)))
        assert server.get_json("/health")["sessions"] == 8
        ninth = await websockets.connect(server.ws())
        error = json.loads(await asyncio.wait_for(ninth.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ninth.recv(), 10)
        metrics = server.get_json("/api/metrics")
        sessions = [server.session_metrics(client.session) for client, _ in results]
        for client, _ in results:
            await client.close()
        return results, error, closed.value.rcvd, metrics, sessions

    results, error, close, metrics, sessions = asyncio.run(run())
    assert all(len(outputs) == 3 for _, outputs in results)
    assert error["type"] == "error" and error["code"] == "server_full"
    assert close.code == 1013 and "server full" in close.reason and "8 sessions" in close.reason
    assert metrics["session_count"] == 8 and metrics["frames_total"] >= 24 and metrics["latency_ms_mean"] > 0
    for session in sessions:
        assert session["frames_out"] == 3 and session["errors"] == 0
        assert session["latency_ms"] > 0
    server.wait_sessions(0)


def test_a_vanished_client_does_not_break_the_others(server, frames):
    async def run():
        steady = await Client.open(server.ws())
        await steady.settings(prompt=PROMPT_B)
        vanishing = await Client.open(server.ws())
        for image in frames:
            await vanishing.ws.send(png(image))
        vanishing.ws.transport.abort()  # gone mid-stream: no close handshake, frames still in flight
        outputs = [await steady.frame(image) for image in frames * 2]
        await steady.close()
        return outputs

    outputs = asyncio.run(run())
    assert len(outputs) == 2 * len(frames)
    server.wait_sessions(0)
    assert server.get_json("/health")["status"] == "ok"


def test_stale_frames_are_dropped_not_queued(server, frames):
    async def run():
        client = await Client.open(server.ws())
        for k in range(40):
            await client.ws.send(png(frames[k % len(frames)]))
        await client.ws.send(json.dumps({"type": "ping", "t": 1}))
        await client.next_message("pong")
        deadline = time.monotonic() + 30
        while True:  # every frame is either served or dropped
            mine = server.session_metrics(client.session)
            if mine["frames_out"] + mine["frames_dropped"] == 40 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await client.close()
        return mine

    mine = asyncio.run(run())
    assert mine["frames_in"] == 40
    assert mine["frames_out"] + mine["frames_dropped"] == 40
    assert mine["frames_dropped"] > 0
    server.wait_sessions(0)


def test_a_flooding_client_does_not_starve_another(server, frames):
    async def run():
        flooder, polite = await Client.open(server.ws()), await Client.open(server.ws())
        stop = asyncio.Event()

        async def flood():
            k = 0
            while not stop.is_set():
                await flooder.ws.send(png(frames[k % len(frames)]))
                k += 1
                await asyncio.sleep(0.002)

        async def drain():  # read the flooder's outputs so its socket never backs up
            with suppress(Exception):
                while True:
                    await flooder.ws.recv()

        tasks = [asyncio.create_task(flood()), asyncio.create_task(drain())]
        start = time.monotonic()
        outputs = [await polite.frame(frames[k % len(frames)]) for k in range(6)]
        seconds = time.monotonic() - start
        stop.set()
        flooded = server.session_metrics(flooder.session)
        await polite.close()
        await flooder.close()
        for task in tasks:
            task.cancel()
        return outputs, seconds, flooded

    outputs, seconds, flooder = asyncio.run(run())
    assert len(outputs) == 6
    assert flooder["frames_dropped"] > 0 and flooder["frames_out"] > 0
    # round-robin: each polite frame waits for at most one flooder frame, never for its backlog
    assert seconds / 6 < 2.0, seconds
    server.wait_sessions(0)


def test_snapshot_has_parameters_and_mjpeg_streams(server, frames):
    from atelier.generate.metadata import parse_parameters

    async def run():
        client = await Client.open(server.ws("format=jpeg&quality=85"))
        await client.settings(prompt=PROMPT_A, seed=5)
        await client.ws.send(png(frames[0]))
        await client.next_frame()
        _, headers, snapshot = await asyncio.to_thread(server.get, client.hello["snapshot"])

        def first_mjpeg_parts(n):
            with urllib.request.urlopen(server.http + client.hello["mjpeg"], timeout=20) as response:
                content_type = response.headers["content-type"]
                parts = []
                while len(parts) < n:
                    assert response.readline() == b"--frame\r\n"
                    head = {}
                    while (line := response.readline()) != b"\r\n":
                        key, value = line.decode().split(":", 1)
                        head[key.strip().lower()] = value.strip()
                    parts.append(response.read(int(head["content-length"])))
                    response.readline()
                return content_type, parts

        reader = asyncio.create_task(asyncio.to_thread(first_mjpeg_parts, 3))
        while not reader.done():  # keep frames coming until the reader has its parts
            await client.ws.send(png(frames[1]))
            await client.next_frame()
        content_type, parts = await reader
        await client.close()
        return headers, snapshot, content_type, parts

    headers, snapshot, content_type, parts = asyncio.run(run())
    assert headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(snapshot))
    assert image.size == (64, 64)
    fields = parse_parameters(image.info["parameters"])
    assert fields["Prompt"] == PROMPT_A and fields["Seed"] == "5" and fields["Model"] == "toyworld-turbo"
    assert content_type.startswith("multipart/x-mixed-replace")
    for part in parts:
        assert part[:2] == b"\xff\xd8"
        assert Image.open(io.BytesIO(part)).size == (64, 64)
    server.wait_sessions(0)


# ---------------------------------------------------------------------------------------------- reference images


@pytest.fixture(scope="module")
def ip_server(tmp_path_factory):
    """A server whose model has a (tiny, random) IP-Adapter, given as create_app's ip_adapter source."""
    from atelier.models import load_pipeline
    from atelier.testing.ip_adapters import write_adapter_folder

    pipe = load_pipeline("toyworld-turbo")
    folder = write_adapter_folder(tmp_path_factory.mktemp("adapter") / "toy-ip", pipe.unet)
    with RunningServer(create_app(pipe, ip_adapter=folder)) as running:
        running.pipe = pipe
        yield running


def test_a_session_uploads_a_reference_scales_and_clears_it(ip_server, frames):
    """The reference changes the session's frames exactly as it changes a StreamEngine's; scale 0 and
    a cleared reference give the text-only frames bit for bit; the snapshot records the reference."""
    import hashlib

    from atelier.generate.metadata import parse_parameters
    from atelier.stream import StreamEngine

    reference = png(frames[3])
    engine = StreamEngine(ip_server.pipe)
    engine.prepare(PROMPT_A, reference=reference, ip_scale=0.7)
    expected = np.asarray(engine(frames[0]))

    async def first_frame(client):  # each frame enters an empty buffer: outputs compare exactly
        await client.ws.send(json.dumps({"type": "reset"}))
        return await client.frame(frames[0])

    async def run():
        client = await Client.open(ip_server.ws())
        await client.settings(prompt=PROMPT_A, ip_scale=0.7)
        text_only = await first_frame(client)
        await client.ws.send(json.dumps({"type": "reference"}))
        await client.ws.send(reference)
        uploaded = (await client.next_message("settings"))["settings"]
        steered = await first_frame(client)
        snapshot = (await asyncio.to_thread(ip_server.get, client.hello["snapshot"]))[2]
        off = await client.settings(ip_scale=0.0)
        at_zero = await first_frame(client)
        await client.settings(ip_scale=0.7)
        cleared = await client.settings(reference=None)
        after_clear = await first_frame(client)
        by_frame = await client.settings(reference="frame")
        await client.ws.send(json.dumps({"type": "edit", "source": "a large red circle at the top left",
                                         "target": "a large blue circle at the top left"}))
        await client.next_message("edit")
        edited = await client.frame(frames[0])  # edit mode runs on a pipeline holding an adapter
        await client.close()
        assert not [m for m in client.messages if m["type"] == "error"], client.messages
        return text_only, uploaded, steered, snapshot, off, at_zero, cleared, after_clear, by_frame, edited

    text_only, uploaded, steered, snapshot, off, at_zero, cleared, after_clear, by_frame, edited = asyncio.run(run())
    ip_server.wait_sessions(0)
    from atelier.edit import EditSettings, Editor

    alone_edit = Editor(ip_server.pipe).edit(frames[0], "a large red circle at the top left",  # text-only edit mode
                                             "a large blue circle at the top left",
                                             EditSettings(method="one-step", seed=2, image_branch="off"))
    assert np.array_equal(edited, np.asarray(alone_edit.image))
    digest = hashlib.sha256(reference).hexdigest()
    assert uploaded["reference"] == f"sha256:{digest}" and uploaded["ip_scale"] == 0.7
    assert np.array_equal(steered, expected) and not np.array_equal(steered, text_only)
    fields = parse_parameters(Image.open(io.BytesIO(snapshot)).info["parameters"])
    assert fields["IP-Adapter image"] == f"sha256:{digest}" and fields["IP-Adapter scale"] == "0.7"
    assert off["ip_scale"] == 0.0 and off["reference"] == f"sha256:{digest}"
    assert np.array_equal(at_zero, text_only) and np.array_equal(after_clear, text_only)
    assert cleared["reference"] is None and by_frame["reference"] == "frame"
    ip_server.wait_sessions(0)


def test_bad_references_get_an_error_and_the_session_goes_on(ip_server, server, frames):
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, format="PNG")
    jpeg = io.BytesIO()
    frames[1].save(jpeg, format="JPEG")
    gif = io.BytesIO()
    frames[1].save(gif, format="GIF")
    binary = [(b"not an image", "bad_reference"), (b"", "bad_reference"), (gif.getvalue(), "bad_reference"),
              (huge.getvalue(), "reference_too_large"), (b"\x89PNG" + bytes(9 * 1024 * 1024), "reference_too_large"),
              (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "bad_reference")]  # truncated: fails on the worker
    settings = [({"reference": "/etc/passwd"}, "not the text"), ({"reference": 3}, "reference image must be"),
                ({"ip_scale": -1}, "ip_scale"), ({"ip_scale": 6}, "ip_scale")]

    async def run(url, cases, expect_settings=True):
        client = await Client.open(url)
        before = await client.settings(prompt=PROMPT_A, reference="frame") if expect_settings else None
        errors = []
        for data, code in cases:
            await client.ws.send(json.dumps({"type": "reference"}))
            await client.ws.send(data)
            errors.append((await client.next_message("error"), code))
            assert (await client.frame(frames[0])).shape == (64, 64, 3)  # the session goes on
        for changes, words in settings if expect_settings else ():
            await client.ws.send(json.dumps({"type": "settings", **changes}))
            errors.append((await client.next_message("error"), "bad_settings"))
            assert words in errors[-1][0]["message"], (changes, errors[-1])
        after = await client.settings(delta=1.0)
        await client.close()
        return before, after, errors

    before, after, errors = asyncio.run(run(ip_server.ws(), binary))
    for error, code in errors:
        assert error["code"] == code, (code, error)
        assert error["message"] and len(error["message"]) < 500
    assert before["reference"] == after["reference"] == "frame" and before["ip_scale"] == after["ip_scale"]

    # a server without an adapter: the page is told why, and a reference is refused in words
    from atelier.models import load_pipeline

    with RunningServer(create_app(load_pipeline("toyworld-turbo"), ip_adapter=False)) as plain:
        public = plain.get_json("/api/settings")
        assert public["ip_adapter"] is False and "--no-ip-adapter" in public["ip_adapter_note"]
        _, _, errors = asyncio.run(run(plain.ws(), [(png(frames[2]), "bad_reference")], expect_settings=False))
        plain.wait_sessions(0)
    assert "needs an IP-Adapter" in errors[0][0]["message"] and "--ip-adapter" in errors[0][0]["message"]
    assert ip_server.get_json("/api/settings")["ip_adapter"] is True
    ip_server.wait_sessions(0)
    server.wait_sessions(0)


# ---------------------------------------------------------------------------------------------- the command


def test_serve_help(capsys):
    from atelier.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--max-sessions" in out and "toyworld-turbo" in out
    assert "--tiny-vae" in out and "toyworld-taesd" in out


def test_the_tiny_vae_reaches_every_session_engine(pipe):
    """create_app loads a --tiny-vae source once; each session's StreamEngine gets that same module."""
    from atelier.core.vae import is_tiny

    manager = create_app(pipe, tiny_vae="toyworld-taesd").state.manager
    first, second = manager.engine_factory(), manager.engine_factory()
    assert is_tiny(manager.tiny_vae) and first.vae is manager.tiny_vae and second.vae is manager.tiny_vae
    assert first.vae_encoder is manager.tiny_vae and create_app(pipe).state.manager.engine_factory().vae is pipe.vae
    encode_only = create_app(pipe, tiny_vae="toyworld-taesd", tiny_vae_for="encode").state.manager.engine_factory()
    assert is_tiny(encode_only.vae_encoder) and encode_only.vae is pipe.vae  # the model's VAE still decodes
    with pytest.raises(UserError, match="tiny_vae_for"):
        create_app(pipe, tiny_vae="toyworld-taesd", tiny_vae_for="decode")


def test_serve_loads_the_tiny_vae_once_and_refuses_an_unknown_one(monkeypatch, tmp_path, capsys):
    import atelier.server.app as app_module
    from atelier.testing.cli import one_error_line, run

    served = []

    class NoServer:
        def __init__(self, app, log_level):
            served.append(app)

        def run(self, sockets):
            sockets[0].close()

    monkeypatch.setattr(app_module, "make_server", NoServer)
    monkeypatch.setattr("atelier.server.cli._quiet_loading", lambda: None)  # the test session's logging stays
    code, _, err = run(["serve", "--port", 0, "--tiny-vae", "toyworld-taesd"], capsys)
    assert code == 0, err
    manager = served[0].state.manager
    assert type(manager.tiny_vae).__name__ == "AutoencoderTiny" and manager.engine_factory().vae is manager.tiny_vae
    code, _, err = run(["serve", "--port", 0, "--tiny-vae", "toyworld-taesd", "--tiny-vae-for", "encode"], capsys)
    assert code == 0, err
    engine = served[1].state.manager.engine_factory()
    assert engine.vae_encoder is served[1].state.manager.tiny_vae and engine.vae is not engine.vae_encoder
    for source in ("no-such-taesd", str(tmp_path / "missing"), "someone/not-cached-taesd"):
        code, _, err = run(["serve", "--port", 0, "--tiny-vae", source], capsys)
        assert one_error_line(code, err) and source in err, err
    assert len(served) == 2  # refused before loading the model


def test_serve_command_max_sessions_and_errors(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "atelier.cli", "serve"]

    bad = subprocess.run(command + ["--model", str(tmp_path / "missing"), "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("atelier: error:")
    bad = subprocess.run(command + ["--port", "0", "--ip-adapter", str(tmp_path / "no-adapter")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no-adapter" in bad.stderr, bad.stderr

    process = subprocess.Popen(command + ["--port", "0", "--max-sessions", "1"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("atelier serve: http://127.0.0.1:"), (line, process.stderr.read() if process.poll() else "")
        base = line.split()[2].rstrip("/")
        port = int(base.rsplit(":", 1)[1])
        with urllib.request.urlopen(base + "/health", timeout=10) as response:
            assert json.loads(response.read())["max_sessions"] == 1

        busy = subprocess.run(command + ["--port", str(port)], env=env, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr

        async def run():
            first = await Client.open(f"ws://127.0.0.1:{port}/ws")
            second = await websockets.connect(f"ws://127.0.0.1:{port}/ws")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(second.recv(), 10)
            await first.close()
            return closed.value.rcvd

        close = asyncio.run(run())
        assert close.code == 1013 and "server full: 1 sessions" in close.reason
    finally:
        process.terminate()
        process.wait(20)
    assert process.returncode in (0, -15)


# ---------------------------------------------------------------------------------------------- protection


def handshake_status(port: int, host: str = "127.0.0.1", origin: str | None = None, path: str = "/ws") -> str:
    """The status line a raw WebSocket handshake gets (headers exactly as given)."""
    import socket

    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if origin:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return sock.recv(4096).split(b"\r\n", 1)[0].decode()


def test_host_and_origin_checks(pipe):
    app = create_app(pipe, max_sessions=2, allowed_origins=["https://studio.example"])
    with RunningServer(app) as server:
        own = f"http://127.0.0.1:{server.port}"
        assert http_status(server, "/api/settings") == 200
        assert http_status(server, "/api/settings", {"Host": "evil.example"}) == 400  # DNS rebinding
        assert handshake_status(server.port, host="evil.example").split()[1] == "400"
        assert handshake_status(server.port, origin="http://evil.example").split()[1] == "403"
        assert handshake_status(server.port, origin=f"http://127.0.0.1:{server.port + 1}").split()[1] == "403"
        assert handshake_status(server.port, origin="null").split()[1] == "403"
        assert handshake_status(server.port, host=f"localhost:{server.port}", origin=f"http://localhost:{server.port}").split()[1] == "101"
        assert handshake_status(server.port, origin="https://studio.example").split()[1] == "101"

        async def run():
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(server.ws(), origin="http://evil.example")
            client = await Client.open(server.ws(), origin=own)  # the server's own page
            await client.close()
            return refused.value.response.status_code

        assert asyncio.run(run()) == 403
        server.wait_sessions(0)


def test_auth_token_protects_everything_but_the_static_files(pipe):
    token = "correct-horse-battery"
    with RunningServer(create_app(pipe, auth_token=token)) as server:
        for path in ("/", "/api/settings", "/api/metrics", "/health", "/api/sessions/x/mjpeg"):
            assert http_status(server, path) == 401, path
            assert http_status(server, path + "?token=wrong-token-value") == 401, path
        assert http_status(server, "/api/settings", {"Authorization": "Bearer nope"}) == 401
        assert http_status(server, "/static/app.js") == 200
        assert http_status(server, f"/?token={token}") == 200
        assert http_status(server, "/api/settings", {"Authorization": f"Bearer {token}"}) == 200
        assert handshake_status(server.port).split()[1] == "403"
        assert handshake_status(server.port, path=f"/ws?token={token}").split()[1] == "101"

        async def run():
            with pytest.raises(websockets.InvalidStatus):
                await websockets.connect(server.ws("format=png&token=nope"))
            client = await Client.open(server.ws(f"format=png&token={token}"))
            await client.close()
            return client.hello

        hello = asyncio.run(run())
        assert hello["snapshot"].startswith(f"/api/sessions/{hello['session']}/")
        server.wait_sessions(0)
    with pytest.raises(UserError, match="8 characters"):
        create_app(pipe, auth_token="short")


def test_idle_sessions_time_out_even_when_they_answer_pings(pipe, frames):
    with RunningServer(create_app(pipe, max_sessions=1, idle_timeout=1.0)) as server:
        async def run():
            idle = await Client.open(server.ws(), ping_interval=0.2)  # protocol pings, answered
            start = time.monotonic()
            await idle.frame(frames[0])  # the last activity
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await idle.ws.send(json.dumps({"type": "ping", "t": 1}))  # app pings: not activity either
                    with suppress(asyncio.TimeoutError):
                        await idle._recv(0.25)
                    assert time.monotonic() - start < 10, "the idle session was never closed"
            seconds = time.monotonic() - start
            while True:  # a send can see the close before the error message buffered ahead of it is read
                try:
                    await idle._recv(0.5)
                except (websockets.ConnectionClosed, asyncio.TimeoutError):
                    break
            errors = [m for m in idle.messages if m["type"] == "error"]
            busy = await Client.open(server.ws())  # the only slot is free again
            for _ in range(6):  # a client that keeps streaming keeps its session
                await busy.frame(frames[1])
                await asyncio.sleep(0.3)
            await busy.close()
            return seconds, errors, closed.value.rcvd

        seconds, errors, close = asyncio.run(run())
        assert 0.9 < seconds < 5, seconds
        assert [e["code"] for e in errors] == ["idle_timeout"]
        assert close.code == 1001 and "idle" in close.reason
        server.wait_sessions(0)


def test_connections_with_unfinished_headers_are_closed(pipe):
    import socket

    with RunningServer(create_app(pipe), header_timeout=1.0) as server:
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start, closed = time.monotonic(), False
        while time.monotonic() - start < 6:
            slow.sendall(b"X-Slow: 1\r\n")  # a header line now and then: never finished
            slow.settimeout(0.3)
            try:
                if slow.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
        seconds = time.monotonic() - start
        slow.close()
        assert closed and seconds < 3, seconds
        # a prompt request, and a kept-alive connection's next prompt request, are served
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for _ in range(2):
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["status"] == "ok"
            time.sleep(0.6)
        connection.close()


def test_a_message_over_the_protocol_limit_gets_a_json_error_then_a_close(pipe, frames):
    app = create_app(pipe, max_frame_bytes=64 * 1024)  # the protocol refuses messages over 256 KiB
    with RunningServer(app) as server:
        async def run():
            client = await Client.open(server.ws())
            await client.ws.send(png(frames[0]))
            await client.next_frame()
            await client.ws.send(os.urandom(300 * 1024))
            error = await client.next_message("error")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await client._recv(10)
            return error, closed.value.rcvd

        error, close = asyncio.run(run())
        assert error["code"] == "frame_too_large" and str(256 * 1024) in error["message"]
        assert close.code == 1009
        server.wait_sessions(0)


def test_serve_warns_on_a_network_address_and_passes_the_token(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    token = "s3cret-token-for-tests"
    command = [sys.executable, "-m", "atelier.cli", "serve", "--host", "0.0.0.0", "--port", "0",
               "--auth-token", token, "--idle-timeout", "30"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("atelier serve: http://127.0.0.1:") and f"/?token={token}" in line, line
        warning = process.stderr.readline()
        assert "warning" in warning and "anyone on the network" in warning and "--auth-token" in warning
        url = line.split()[2]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        base = url.split("/?")[0]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/health", timeout=10)
        assert refused.value.code == 401
    finally:
        process.terminate()
        process.wait(20)

    bad = subprocess.run([sys.executable, "-m", "atelier.cli", "serve", "--allowed-origin", "evil.example",
                          "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--allowed-origin" in bad.stderr and "Traceback" not in bad.stderr


def test_default_hosts_and_origin_rules():
    from atelier.server.security import allowed_hosts_for, is_loopback, normal_origin, origin_allowed

    assert allowed_hosts_for("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts_for("192.168.1.5")[0] == "192.168.1.5" and allowed_hosts_for("0.0.0.0") == ["*"]
    assert allowed_hosts_for("0.0.0.0", ["Studio.Local", "fe80::1"]) == ["studio.local", "[fe80::1]"]
    for bad in ("studio.local:7860", "a*b"):
        with pytest.raises(UserError, match="--allowed-host"):
            allowed_hosts_for("0.0.0.0", [bad])
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    own = frozenset()
    assert origin_allowed(None, "127.0.0.1:7860", own)  # not a browser
    assert origin_allowed("http://127.0.0.1:7860", "127.0.0.1:7860", own)
    assert origin_allowed("http://[::1]:7860", "[::1]:7860", own)
    assert not origin_allowed("http://127.0.0.1:7861", "127.0.0.1:7860", own)
    assert not origin_allowed("http://evil.example", "127.0.0.1:7860", own)
    assert not origin_allowed("null", "127.0.0.1:7860", own)
    listed = frozenset([normal_origin("HTTPS://Studio.Example/")])
    assert origin_allowed("https://studio.example", "127.0.0.1:7860", listed)
    assert origin_allowed("https://anything.example", "h", frozenset(["*"]))
    with pytest.raises(UserError, match="--allowed-origin"):
        normal_origin("studio.example")
