"""Open a report in a real headless Chromium, check what it rendered and take a screenshot.

Chromium is driven through its DevTools protocol on a loopback port (aiohttp's websocket client, which Ray
already installs); it runs with a fresh profile and no network features, and is stopped by its process group.

    python -m bp_ray.eval.browser runs/tiny/eval/report.html report.png
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run")

# What the page shows, measured in the browser after every image settled.
_PAGE_STATE_JS = """(() => {
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect();
                      return {x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height}; };
  const tables = {};
  for (const t of document.querySelectorAll('table[id]')) tables[t.id] = {rows: t.rows.length, box: box(t)};
  const images = Array.from(document.images);
  const ok = i => i.complete && i.naturalWidth > 0;
  return {title: document.title, tables: tables, images: images.length, loaded: images.filter(ok).length,
          broken: images.filter(i => !ok(i)).map(i => i.getAttribute('src')),
          first_grid_image: box(document.querySelector('#grid img')),
          width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight};
})()"""
_SETTLED_JS = "document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"


@dataclass
class PageState:
    """What Chromium rendered: tables by id (rows, box), images loaded / total, and the screenshot's path."""

    title: str
    tables: dict[str, dict[str, Any]]
    images: int
    loaded: int
    broken: list[str]
    first_grid_image: dict[str, float] | None
    width: int
    height: int
    screenshot: Path
    console_errors: list[str] = field(default_factory=list)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _devtools_port(profile: Path, process: subprocess.Popen, deadline: float) -> int:
    """Chromium writes the port it chose into <profile>/DevToolsActivePort."""
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with code {process.returncode} before opening DevTools")
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port in time")


class _DevTools:
    """Minimal DevTools protocol session: send a command, wait for its reply, keep console errors."""

    def __init__(self, ws: Any):
        self.ws, self.ids, self.console_errors = ws, itertools.count(1), []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("method") == "Runtime.exceptionThrown":
                self.console_errors.append(message["params"]["exceptionDetails"].get("text", "exception"))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


async def _inspect(port: int, url: str, screenshot: Path, width: int, max_height: int, deadline: float) -> PageState:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tools = _DevTools(ws)
            await tools.call("Runtime.enable")
            await tools.call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                             mobile=False)
            await tools.call("Page.navigate", url=url)
            while not await tools.evaluate(_SETTLED_JS):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not finish loading in time")
                await asyncio.sleep(0.1)
            state = await tools.evaluate(_PAGE_STATE_JS)
            height = min(int(state["height"]), max_height)
            shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                    clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return PageState(**state, screenshot=screenshot, console_errors=tools.console_errors)


def render_page(html_path: Path, screenshot: Path, width: int = 1400, max_height: int = 12000,
                timeout_s: float = 60.0, chromium: str | None = None) -> PageState:
    """Load html_path in headless Chromium, measure what rendered, screenshot the top max_height pixels."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); "
                                "on Debian: apt-get install chromium")
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="bp-ray-chromium-") as profile:
        process = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                    "--remote-debugging-port=0", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = _devtools_port(Path(profile), process, deadline)
            return asyncio.run(_inspect(port, Path(html_path).resolve().as_uri(), Path(screenshot), width,
                                        max_height, deadline))
        finally:
            # Chromium forks helpers: end the whole group this call started, then reap.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot an HTML report in headless Chromium")
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--max-height", type=int, default=12000)
    args = parser.parse_args(argv)
    state = render_page(args.html, args.png, width=args.width, max_height=args.max_height)
    tables = ", ".join(f"{name} {info['rows']} rows" for name, info in state.tables.items())
    print(f"{args.png}: {state.width}x{state.height} page, tables: {tables}; images {state.loaded}/{state.images} "
          f"loaded")
    return 0 if state.loaded == state.images else 1


if __name__ == "__main__":
    sys.exit(main())
