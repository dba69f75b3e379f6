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

    def __init__(self, app):
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = make_server(app)
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

    def get(self, path: str):
        with urllib.request.urlopen(self.http + path, timeout=10) as response:
            body = response.read()
            return response.status, response.headers, body

    def get_json(self, path: str):
        return json.loads(self.get(path)[2])

    def wait_sessions(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.get_json("/health")["sessions"] != n:
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

    @classmethod
    async def open(cls, url: str) -> "Client":
        client = cls(await websockets.connect(url))
        hello = await client.next_message("hello")
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
    assert settings["ip_adapter"] is False
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
    ]

    async def run():
        client = await Client.open(server.ws())
        before = await client.settings(prompt=PROMPT_A, guidance_scale=2.0)
        first = await client.frame(frames[0])
        for message, code in cases:
            await client.ws.send(message)
            error = await client.next_message("error")
            assert error["code"] == code, (message[:40], error)
            assert error["message"]
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
        for client, _ in results:
            await client.close()
        return results, error, closed.value.rcvd, metrics

    results, error, close, metrics = asyncio.run(run())
    assert all(len(outputs) == 3 for _, outputs in results)
    assert error["type"] == "error" and error["code"] == "server_full"
    assert close.code == 1013 and "server full" in close.reason and "8 sessions" in close.reason
    assert metrics["session_count"] == 8 and len(metrics["sessions"]) == 8
    for session in metrics["sessions"]:
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
            mine = [s for s in server.get_json("/api/metrics")["sessions"] if s["session"] == client.session][0]
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
        metrics = server.get_json("/api/metrics")
        await polite.close()
        await flooder.close()
        for task in tasks:
            task.cancel()
        return outputs, seconds, {s["session"]: s for s in metrics["sessions"]}[flooder.session]

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
        _, headers, snapshot = await asyncio.to_thread(server.get, f"/api/sessions/{client.session}/snapshot.png")

        def first_mjpeg_parts(n):
            with urllib.request.urlopen(f"{server.http}/api/sessions/{client.session}/mjpeg", timeout=20) as response:
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


# ---------------------------------------------------------------------------------------------- the command


def test_serve_help(capsys):
    from atelier.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--max-sessions" in out and "toyworld-turbo" in out


def test_serve_command_max_sessions_and_errors(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "atelier.cli", "serve"]

    bad = subprocess.run(command + ["--model", str(tmp_path / "missing"), "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("atelier: error:")

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
