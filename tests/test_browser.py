"""The page of `atelier serve` in a real headless Chromium, driven by Playwright, against the real
command, started with --auth-token: the page passes the token on, the toy animation streams through
the model, a prompt change changes the output, and the snapshot link is the session's private one.
Started with --ip-adapter, the page's reference slot uploads a reference, scales it and clears it.

Needs /usr/bin/chromium (CI installs it) and the `playwright` package; never `playwright install`.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage",
]
PROMPT_A = "a large red circle at the top left and a small blue square in the center"
PROMPT_B = "a small green triangle at the bottom right"
TOKEN = "browser-test-token"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")

# A hash of the output canvas's pixels, computed in the page.
OUTPUT_HASH = """() => {
  const c = document.getElementById("output");
  const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let h = 2166136261;
  for (let i = 0; i < data.length; i++) { h ^= data[i]; h = Math.imul(h, 16777619) >>> 0; }
  return h;
}"""


def serve(*options):
    """`atelier serve` with `options` on a free port; yields its base URL, stops it afterwards."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "atelier.cli", "serve", "--port", "0", "--auth-token", TOKEN,
                                *map(str, options)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if not line.startswith("atelier serve: http://"):
            process.kill()
            pytest.fail(f"atelier serve did not start: {line!r} {process.stderr.read()}")
        url = line.split()[2]
        assert url.endswith(f"/?token={TOKEN}"), url
        yield url.split("/?")[0]
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module")
def server_url():
    yield from serve()


@pytest.fixture(scope="module")
def adapter_server_url(tmp_path_factory):
    """The server with a (tiny, random) IP-Adapter for toyworld-turbo: --ip-adapter FOLDER."""
    from atelier.models import load_pipeline
    from atelier.testing.ip_adapters import write_adapter_folder

    folder = write_adapter_folder(tmp_path_factory.mktemp("adapter") / "toy-ip", load_pipeline("toyworld-turbo").unet)
    yield from serve("--ip-adapter", folder)


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        )
        try:
            page = context.new_page()
            page.problems = []
            page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: msg.type == "error" and page.problems.append(f"console: {msg.text} {msg.location}"))
            yield page
        finally:
            context.close()


def wait_frames(page, more: int, timeout: float = 60.0) -> int:
    """Wait until `more` further output frames have arrived; return the new count."""
    target = page.evaluate("window.atelier.framesReceived") + more
    page.wait_for_function(f"window.atelier.framesReceived >= {target}", timeout=timeout * 1000)
    return target


def steady_hash(page, timeout: float = 60.0) -> int:
    """The output hash once three frames in a row agree (the input is paused)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        wait_frames(page, 1)
        seen.append(page.evaluate(OUTPUT_HASH))
        if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
            return seen[-1]
    pytest.fail(f"output never settled on a paused input: {seen}")


def test_page_streams_the_toy_world_and_follows_the_prompt(server_url, page):
    assert page.request.get(server_url + "/api/settings").status == 401
    page.goto(f"{server_url}/?token={TOKEN}")
    page.wait_for_selector("#controls .control")
    for key in ("guidance_scale", "delta", "seed", "strength", "blend_prompt", "blend"):
        assert page.locator(f"#setting-{key}").count() == 1, key
    assert page.locator("#source").input_value() == "toy"
    config = page.evaluate("window.atelier.config")
    if not config["ip_adapter"]:  # the reference slot is off, and says why
        assert page.locator("#reference").is_disabled()
        assert page.locator("#reference-note").inner_text() == config["ip_adapter_note"] and config["ip_adapter_note"]
    assert page.evaluate("[document.getElementById('input').width, document.getElementById('output').width]") == [64, 64]

    page.fill("#prompt", PROMPT_A)
    page.check("#toy-pause")  # a still input: the output must then be still too
    page.click("#start")
    page.wait_for_function("window.atelier.session !== null", timeout=30_000)
    wait_frames(page, 5)
    before = steady_hash(page)

    page.fill("#prompt", PROMPT_B)
    page.wait_for_function(f"window.atelier.lastSettings && window.atelier.lastSettings.prompt === {PROMPT_B!r}",
                           timeout=30_000)
    wait_frames(page, 3)
    after = steady_hash(page)
    assert after != before, "the output did not change with the prompt"

    page.uncheck("#toy-pause")  # the animation moves again: so does the output
    hashes = set()
    for _ in range(12):
        wait_frames(page, 1)
        hashes.add(page.evaluate(OUTPUT_HASH))
    assert len(hashes) >= 3, hashes

    state = page.evaluate("({sent: window.atelier.framesSent, received: window.atelier.framesReceived, "
                          "error: window.atelier.lastError})")
    assert state["error"] is None and state["sent"] >= state["received"] > 20
    assert float(page.locator("#fps").inner_text()) > 0
    page.wait_for_function("document.getElementById('latency').textContent !== '–'", timeout=10_000)

    href = page.locator("#snapshot").get_attribute("href")
    session = page.evaluate("window.atelier.session")
    assert href.startswith(f"/api/sessions/{session}/snapshot.png?key=") and f"&token={TOKEN}" in href
    assert page.request.get(server_url + href.split("?")[0] + f"?token={TOKEN}").status == 404  # no key: private
    assert page.locator("#mjpeg").get_attribute("href").startswith(f"/api/sessions/{session}/mjpeg?key=")
    response = page.request.get(server_url + href)
    assert response.ok
    snapshot = Image.open(io.BytesIO(response.body()))
    assert snapshot.size == (64, 64) and snapshot.info["parameters"].startswith(PROMPT_B)

    page.click("#start")  # stop
    page.wait_for_function("window.atelier.ws === null", timeout=10_000)
    assert page.problems == []


def test_page_uploads_scales_and_clears_a_reference_image(adapter_server_url, page, tmp_path):
    from atelier.toyworld import parse_caption, render_pil

    reference = tmp_path / "reference.png"
    render_pil(parse_caption("a large purple diamond in the center")).save(reference)
    page.goto(f"{adapter_server_url}/?token={TOKEN}")
    page.wait_for_selector("#controls .control")
    assert not page.locator("#reference").is_disabled() and page.locator("#reference-note").inner_text() == ""
    assert page.locator("#setting-ip_scale").get_attribute("max") == "5"
    page.fill("#prompt", PROMPT_A)
    page.check("#toy-pause")
    page.click("#start")
    page.wait_for_function("window.atelier.session !== null", timeout=30_000)
    wait_frames(page, 3)
    text_only = steady_hash(page)

    def settled(condition: str) -> int:
        page.wait_for_function(f"window.atelier.lastSettings && {condition}", timeout=30_000)
        wait_frames(page, 2)
        return steady_hash(page)

    page.set_input_files("#reference", str(reference))
    steered = settled("String(window.atelier.lastSettings.reference).startsWith('sha256:')")
    assert steered != text_only, "the reference did not change the output"
    assert "reference: sha256:" in page.locator("#reference-state").inner_text()
    page.fill("#setting-ip_scale", "0")
    assert settled("window.atelier.lastSettings.ip_scale === 0") == text_only  # scale 0: the text-only stream
    page.fill("#setting-ip_scale", "5")
    assert settled("window.atelier.lastSettings.ip_scale === 5") != text_only
    page.click("#reference-clear")
    assert settled("window.atelier.lastSettings.reference === null") == text_only
    assert page.evaluate("window.atelier.lastError") is None
    page.click("#start")
    page.wait_for_function("window.atelier.ws === null", timeout=10_000)
    assert page.problems == []
