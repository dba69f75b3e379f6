"""Soak `atelier serve`: stream many frames through a real server and watch its memory.

A uvicorn server runs in this process on 127.0.0.1 (a free port); `--sessions` WebSocket clients
stream rendered toy-world frames, one in flight each, changing prompt and seed every
`--settings-every` frames and reconnecting (a new session, a new engine) every
`--reconnect-every` frames. The process's resident memory is printed every `--report-every`
frames; the growth ratio is the last reading over the one taken after the warm-up (5 % of the
frames, at least 200). A server that leaks per frame or per session shows a ratio well above 1.

    HF_HUB_OFFLINE=1 python benchmarks/stream_soak.py --frames 10000 --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/stream_soak.py --frames 60     # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import threading
import time

import websockets

from _results import check_command, command_line, write_section
from atelier.models import load_pipeline
from atelier.server.app import create_app, listen, make_server
from atelier.toyworld import render_pil, sample_scene

PROMPTS = [
    "a large red circle at the top left",
    "a small blue square in the center and a large yellow triangle on the right",
    "a large green diamond at the bottom",
    "a small purple circle on the left and a small orange square at the top right",
]


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def toy_frames(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    frames = []
    for _ in range(n):
        buffer = io.BytesIO()
        render_pil(sample_scene(rng)).save(buffer, format="JPEG", quality=90)
        frames.append(buffer.getvalue())
    return frames


class Soak:
    def __init__(self, url: str, args):
        self.url, self.args = url, args
        self.frames = toy_frames(64)
        self.done = 0
        self.lock = asyncio.Lock()
        self.start = time.perf_counter()
        self.warm_rss = None
        self.readings = []

    async def take(self) -> int | None:
        """The number of the next frame to send, or None when all are sent."""
        async with self.lock:
            if self.done >= self.args.frames:
                return None
            self.done += 1
            n = self.done
        if n % self.args.report_every == 0 or n == self.args.frames:
            self.report(n)
        if n == max(200, self.args.frames // 20):
            self.warm_rss = rss_mb()
        return n

    def report(self, n: int) -> None:
        elapsed = time.perf_counter() - self.start
        rss = rss_mb()
        self.readings.append((n, rss))
        print(f"{n:>8} frames  {elapsed:8.1f} s  {n / elapsed:6.1f} fps  RSS {rss:8.1f} MiB", flush=True)

    async def client(self, index: int) -> None:
        rng = random.Random(index)
        sent_in_session = 0
        ws = await self.connect()
        try:
            while (n := await self.take()) is not None:
                if sent_in_session and sent_in_session % self.args.reconnect_every == 0:
                    await ws.close()
                    ws = await self.connect()
                if n % self.args.settings_every == 0:
                    await ws.send(json.dumps({"type": "settings", "prompt": rng.choice(PROMPTS),
                                              "seed": rng.randrange(1000)}))
                await ws.send(self.frames[n % len(self.frames)])
                while not isinstance(await ws.recv(), bytes):
                    pass
                sent_in_session += 1
        finally:
            await ws.close()

    async def connect(self):
        ws = await websockets.connect(self.url)
        while True:  # hello, then the engine's first settings
            message = json.loads(await ws.recv())
            if message["type"] == "settings":
                return ws
            if message["type"] == "error":
                raise RuntimeError(message["message"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000, help="frames in all (default 10000)")
    parser.add_argument("--sessions", type=int, default=2, help="simultaneous clients (default 2)")
    parser.add_argument("--model", default="toyworld-turbo")
    parser.add_argument("--report-every", type=int, default=None, help="frames between readings (default frames/20)")
    parser.add_argument("--settings-every", type=int, default=50, help="frames between prompt/seed changes (default 50)")
    parser.add_argument("--reconnect-every", type=int, default=1000,
                        help="frames a session streams before its client reconnects (default 1000)")
    parser.add_argument("--results", help="write the readings into this markdown file's 'Stream soak' section")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.frames < 1 or args.sessions < 1:
        parser.error("--frames and --sessions must be at least 1")
    if args.results:
        check_command(__file__, argv)
    args.report_every = args.report_every or max(1, args.frames // 20)

    app = create_app(load_pipeline(args.model), max_sessions=args.sessions)
    sock = listen("127.0.0.1", 0)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
    print(f"model {args.model}, {args.sessions} sessions, {args.frames} frames; RSS at start {rss_mb():.1f} MiB",
          flush=True)
    soak = Soak(url, args)

    async def run():
        await asyncio.gather(*(soak.client(i) for i in range(args.sessions)))

    try:
        asyncio.run(run())
    finally:
        server.should_exit = True
        thread.join(20)
    final = soak.readings[-1][1]
    warm = soak.warm_rss or soak.readings[0][1]
    peak = max(r for _, r in soak.readings)
    summary = (f"RSS after warm-up {warm:.1f} MiB, final {final:.1f} MiB, peak {peak:.1f} MiB; "
               f"growth ratio {final / warm:.3f}")
    print(summary)
    if args.results:
        body = [f"model {args.model}, {args.sessions} sessions, {args.frames} frames through a real server "
                f"(settings change every {args.settings_every}, reconnect every {args.reconnect_every})", ""]
        body += [f"after {frames:>6} frames: RSS {rss:7.1f} MiB" for frames, rss in soak.readings]
        body += ["", summary]
        write_section(args.results, "stream-soak", "Stream soak (atelier serve)", "\n".join(body), command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
