"""Render pages of the Prefect and MLflow web UIs in headless Chromium, for end-to-end tests.

Both UIs are single-page apps: the HTML the server sends is an empty shell that JavaScript fills in after
several API calls. ``render`` therefore drives Chromium over the DevTools protocol and polls the live DOM
until it holds the texts the test expects and has settled, then keeps a PNG of the viewport and returns
the DOM. That is steadier, and no slower, than ``chromium --dump-dom --virtual-time-budget=MS``, whose
budget has to be guessed: on a busy machine Prefect's flow-run page sometimes still said "This run didn't
generate logs" after 5-10 s of virtual time, and each call took 7-17 s.

Chromium comes from ``$CQ_CHROMIUM`` or the PATH (Debian: ``apt-get install chromium``). Each call starts
its own browser with a throw-away profile, and kills it, all its processes, when done.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root, in containers
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MB: use /tmp instead
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # the UIs under test are local
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
)
VIEWPORT = {"width": 1400, "height": 1000}  # CSS pixels, the size of the PNGs
POLL_S = 0.25
SETTLE_S = 3  # the longest wait for the pixels to settle once the DOM has
# How far the page is: its HTML ('' while the document loads) and how many requests it has completed.
STATE_SCRIPT = (
    "[document.readyState == 'complete' ? document.documentElement.outerHTML : '',"
    " performance.getEntriesByType('resource').length]"
)


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary: ``$CQ_CHROMIUM``, else the first one on the PATH, else None."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    return os.environ.get("CQ_CHROMIUM") or next(filter(None, map(shutil.which, names)), None)


def render(url: str, screenshot: Path, *, expect: Iterable[str] = (), wait_ms: int = 60_000) -> str:
    """Load ``url``, write a PNG of the viewport to ``screenshot`` and return the rendered DOM as HTML.

    Returns as soon as the page has loaded, its HTML contains every string in ``expect``, neither the
    HTML nor the number of requests the page has completed changed over one poll (250 ms), and two
    screenshots in a row are the same (at most ``SETTLE_S`` more): 8-14 s after the call for the
    Prefect and MLflow pages on a busy 2-core machine, most of it their JavaScript loading. Pass in
    ``expect`` what the page shows once its data has arrived; without it the page's loading state may
    be all there is. Raises AssertionError, with Chromium's stderr, if Chromium fails, the URL does not
    load, or the page is not ready after ``wait_ms`` (the screenshot then shows what the page did show).
    """
    chromium = find_chromium()
    assert chromium, "no Chromium: install it (apt-get install chromium) or set CQ_CHROMIUM"
    expect = list(expect)
    deadline = time.monotonic() + wait_ms / 1000
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="cq-chromium-", ignore_cleanup_errors=True) as profile,
        tempfile.TemporaryFile() as stderr,
    ):
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)

        def fail(message: str) -> AssertionError:
            stderr.seek(0)
            return AssertionError(f"{message}\n{' '.join(command)}\nChromium's stderr:\n{stderr.read().decode()}")

        try:
            port_file = Path(profile, "DevToolsActivePort")  # "PORT\n/devtools/browser/ID" once listening
            while len(port_file.read_text().split() if port_file.exists() else ()) < 2:
                if proc.poll() is not None:
                    raise fail(f"Chromium exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise fail("Chromium opened no DevTools port")
                time.sleep(0.05)
            port = port_file.read_text().split()[0]
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with no_proxy.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
                page = next(target for target in json.load(reply) if target["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], proxy=None, max_size=None, open_timeout=10) as devtools:
                ids = itertools.count(1)

                def call(method: str, **params) -> dict:
                    """Send one DevTools command and return its result."""
                    devtools.send(json.dumps({"id": (ident := next(ids)), "method": method, "params": params}))
                    while (reply := json.loads(devtools.recv(timeout=30))).get("id") != ident:
                        pass  # an event: none is subscribed to, but skip any all the same
                    if "error" in reply:
                        raise fail(f"{url}: {method} failed: {reply['error']}")
                    return reply["result"]

                def save_screenshot(settle_s: float = 0) -> None:
                    """Write a PNG of the viewport, once two in a row are the same or after ``settle_s``."""
                    until = min(time.monotonic() + settle_s, deadline)
                    png, previous_png = call("Page.captureScreenshot")["data"], None
                    while png != previous_png and time.monotonic() < until:
                        time.sleep(POLL_S)
                        png, previous_png = call("Page.captureScreenshot")["data"], png
                    screenshot.write_bytes(base64.b64decode(png))

                call("Emulation.setDeviceMetricsOverride", **VIEWPORT, deviceScaleFactor=1, mobile=False)
                if error := call("Page.navigate", url=url).get("errorText"):
                    raise fail(f"{url}: {error}")
                state = previous = ["", 0]
                while not (state[0] and state == previous and all(text in state[0] for text in expect)):
                    if time.monotonic() > deadline:
                        save_screenshot()
                        missing = [text for text in expect if text not in state[0]]
                        raise fail(f"{url}: not ready after {wait_ms} ms, missing {missing}; see {screenshot}")
                    time.sleep(POLL_S)
                    reply = call("Runtime.evaluate", expression=STATE_SCRIPT, returnByValue=True)
                    previous, state = state, reply["result"]["value"]
                save_screenshot(SETTLE_S)  # a canvas (Prefect's run graph) may still be drawing
                return state[0]
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone already when Chromium failed to start
                os.killpg(proc.pid, signal.SIGKILL)  # the browser with its renderer, GPU and zygote processes
            proc.wait()
