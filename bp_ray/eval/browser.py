"""Open a report in a real headless Chromium, check what it rendered and take a screenshot.

Chromium is driven through its DevTools protocol on a loopback port (aiohttp's websocket client, which Ray
already installs); it runs with a fresh profile and no network features, and is stopped by its process group.

    python -m bp_ray.eval.browser runs/tiny/eval/report.html report.png

`BrowserSession` keeps one Chromium for several pages, each in its own browser context (own cookies), for tests
that click through a web app as several users at once.
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


def _devtools_endpoint(profile: Path, process: subprocess.Popen, deadline: float) -> tuple[int, str]:
    """Chromium writes the port it chose and its browser websocket path into <profile>/DevToolsActivePort."""
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with code {process.returncode} before opening DevTools")
        if marker.exists():
            lines = marker.read_text().splitlines()
            if len(lines) >= 2 and lines[0].isdigit():
                return int(lines[0]), lines[1]
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port in time")


def _devtools_port(profile: Path, process: subprocess.Popen, deadline: float) -> int:
    return _devtools_endpoint(profile, process, deadline)[0]


def _start_chromium(chromium: str | None, profile: str) -> subprocess.Popen:
    """Headless Chromium on a fresh profile, DevTools on a free loopback port, in its own process group."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); "
                                "on Debian: apt-get install chromium")
    return subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop_chromium(process: subprocess.Popen) -> None:
    # Chromium forks helpers: end the whole group this module started, then reap.
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="bp-ray-chromium-") as profile:
        process = _start_chromium(chromium, profile)
        try:
            port = _devtools_port(Path(profile), process, deadline)
            return asyncio.run(_inspect(port, Path(html_path).resolve().as_uri(), Path(screenshot), width,
                                        max_height, deadline))
        finally:
            _stop_chromium(process)


# key -> (code, Windows virtual key code): what Input.dispatchKeyEvent needs for the page to see a real key press.
KEYS = {"ArrowLeft": ("ArrowLeft", 37), "ArrowUp": ("ArrowUp", 38), "ArrowRight": ("ArrowRight", 39),
        "ArrowDown": ("ArrowDown", 40), "Enter": ("Enter", 13), "Escape": ("Escape", 27), "Tab": ("Tab", 9)}

# Set before an action that navigates; gone once the next document is loaded.
_NAV_MARK_JS = "window.__bpNavigating = true"
_NAVIGATED_JS = "!window.__bpNavigating && document.readyState === 'complete'"


class BrowserSession:
    """One headless Chromium for a test: `new_page()` opens a page in a fresh browser context (its own cookies
    and storage, like a separate user), and every page method is synchronous (an event loop owned by the session
    runs each DevTools exchange). Use as a context manager; close() stops Chromium and deletes its profile.

        with BrowserSession() as browser:
            page = browser.new_page()
            page.goto("http://127.0.0.1:8600/")
            page.type("#name", "Ada"); page.click("#start")
    """

    def __init__(self, chromium: str | None = None, timeout_s: float = 30.0):
        """timeout_s: the longest any one call (navigation, wait, command) may take."""
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="bp-ray-chromium-")
        self._loop = asyncio.new_event_loop()
        self._process = _start_chromium(chromium, self._profile.name)
        self._http: Any = None
        self._ws: Any = None
        self._ids = itertools.count(1)
        self.errors: dict[str, list[str]] = {}
        """Uncaught page exceptions by DevTools session id."""
        try:
            port, path = _devtools_endpoint(Path(self._profile.name), self._process, time.monotonic() + timeout_s)
            self._run(self._connect(f"ws://127.0.0.1:{port}{path}"))
        except BaseException:
            self.close()
            raise

    async def _connect(self, url: str) -> None:
        import aiohttp

        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=0)

    def _run(self, coro: Any, timeout_s: float | None = None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout_s or self.timeout_s))

    async def _call(self, method: str, session_id: str | None = None, **params: Any) -> dict[str, Any]:
        """One command and its reply; events read meanwhile are kept only as far as errors go."""
        import aiohttp

        message_id = next(self._ids)
        request = {"id": message_id, "method": method, "params": params}
        if session_id:
            request["sessionId"] = session_id
        await self._ws.send_str(json.dumps(request))
        while True:
            frame = await self._ws.receive()
            if frame.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed during {method}")
            message = json.loads(frame.data)
            if message.get("method") == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text", "exception")
                self.errors.setdefault(message.get("sessionId", ""), []).append(text)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})

    def call(self, method: str, session_id: str | None = None, **params: Any) -> dict[str, Any]:
        """A raw DevTools command (for the browser, or for one page's session)."""
        return self._run(self._call(method, session_id, **params))

    def new_page(self, width: int = 1280, height: int = 900) -> BrowserPage:
        """A blank page in a new, isolated browser context."""
        context = self.call("Target.createBrowserContext")["browserContextId"]
        target = self.call("Target.createTarget", url="about:blank", browserContextId=context)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable"):
            self.call(method, session)
        self.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        return BrowserPage(self, context, session)

    def close(self) -> None:
        """Stops Chromium (its whole process group) and removes its profile; safe to call twice."""
        try:
            if self._ws is not None:
                self._run(self._ws.close(), 5)
            if self._http is not None:
                self._run(self._http.close(), 5)
        except (RuntimeError, TimeoutError, OSError):
            pass  # Chromium is stopped below either way
        finally:
            self._ws = self._http = None
            if self._process.poll() is None:
                _stop_chromium(self._process)
            if not self._loop.is_closed():
                self._loop.close()
            self._profile.cleanup()

    def __enter__(self) -> BrowserSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BrowserPage:
    """One page of a BrowserSession, in its own browser context. Actions that submit a form or follow a link take
    navigate=True and return once the next document has loaded (images included)."""

    def __init__(self, browser: BrowserSession, context_id: str, session_id: str):
        self.browser, self.context_id, self.session_id = browser, context_id, session_id

    @property
    def errors(self) -> list[str]:
        """Uncaught JS exceptions of this page so far."""
        return self.browser.errors.get(self.session_id, [])

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.call(method, self.session_id, **params)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JS expression (promises awaited); a thrown exception raises RuntimeError."""
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float | None = None) -> Any:
        """Poll a JS expression until it is truthy (errors while a document is replaced count as not yet)."""
        deadline = time.monotonic() + (timeout_s or self.browser.timeout_s)
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited in vain for: {expression}")
            time.sleep(0.05)

    def _navigating(self, action: Any, navigate: bool) -> None:
        if navigate:
            self.evaluate(_NAV_MARK_JS)
        action()
        if navigate:
            self.wait_for(_NAVIGATED_JS)

    def goto(self, url: str) -> None:
        """Load url and wait until it and its images have loaded."""
        def navigate() -> None:
            result = self._call("Page.navigate", url=url)
            if result.get("errorText"):
                raise RuntimeError(f"{url}: {result['errorText']}")

        self._navigating(navigate, True)

    def click(self, selector: str, navigate: bool = False) -> None:
        """A real mouse click in the middle of the first element matching a CSS selector."""
        point = self.evaluate(f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
            if (!el) return null; el.scrollIntoView({{block: 'center'}}); const r = el.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()""")
        if point is None:
            raise LookupError(f"no element matches {selector!r}")

        def press() -> None:
            for kind in ("mousePressed", "mouseReleased"):
                self._call("Input.dispatchMouseEvent", type=kind, x=point["x"], y=point["y"], button="left",
                           clickCount=1)

        self._navigating(press, navigate)

    def press(self, key: str, navigate: bool = False) -> None:
        """Press and release one key of KEYS (e.g. "ArrowLeft") as the focused document receives it."""
        code, key_code = KEYS[key]

        def press() -> None:
            for kind in ("keyDown", "keyUp"):
                self._call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                           nativeVirtualKeyCode=key_code, **({"text": "\r"} if key == "Enter" and kind == "keyDown"
                                                             else {}))

        self._navigating(press, navigate)

    def type(self, selector: str, text: str) -> None:
        """Focus the element matching selector and type text into it."""
        if not self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
                             "if (!el) return false; el.focus(); return true; })()"):
            raise LookupError(f"no element matches {selector!r}")
        self._call("Input.insertText", text=text)

    def html(self) -> str:
        """The current document's markup."""
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> Path:
        """PNG of the viewport."""
        shot = self._call("Page.captureScreenshot", format="png")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        """Close the page and drop its browser context (cookies included)."""
        self.browser.call("Target.disposeBrowserContext", browserContextId=self.context_id)


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
