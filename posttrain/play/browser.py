"""Drive the play page in headless Chromium over the DevTools protocol (no chromedriver needed).

    with HeadlessChromium() as browser:           # Debian's `chromium`
        browser.open("http://127.0.0.1:8000/")
        browser.evaluate("play.waitFrames(1)")     # promises are awaited
        browser.press("w")
        png = browser.screenshot()

Used by tests/test_play.py, benchmarks/bench_play.py (in-browser fps and latency) and docs/play.md's
screenshot. Every wait is on an event or a page-side promise, with a generous timeout.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import urllib.request

# DevTools key descriptions for Input.dispatchKeyEvent: key -> (code, windowsVirtualKeyCode, text).
KEYS = {
    "ArrowUp": ("ArrowUp", 38, ""), "ArrowDown": ("ArrowDown", 40, ""),
    "ArrowLeft": ("ArrowLeft", 37, ""), "ArrowRight": ("ArrowRight", 39, ""),
    "Enter": ("Enter", 13, "\r"), " ": ("Space", 32, " "),
    **{c: (f"Key{c.upper()}", ord(c.upper()), c) for c in "abcdefghijklmnopqrstuvwxyz"},
    **{d: (f"Digit{d}", ord(d), d) for d in "0123456789"},
}


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class HeadlessChromium:
    """One headless Chromium with one page, driven through the DevTools protocol's WebSocket."""

    def __init__(self, binary: str | None = None, width: int = 1200, height: int = 820, timeout: float = 120.0):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise FileNotFoundError("no chromium found (Debian: apt-get install -y chromium)")
        self.size, self.timeout = (width, height), timeout
        self.profile = tempfile.mkdtemp(prefix="posttrain-chromium-")
        self.process = None
        self.socket = None
        self._stack = contextlib.ExitStack()
        self._id = 0
        self.events: list[dict] = []

    def __enter__(self) -> HeadlessChromium:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        from websockets.sync.client import connect

        command = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", "--disable-extensions", "--mute-audio", "--remote-debugging-port=0",
                   "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
                   f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        endpoint = self._devtools_endpoint()
        port = endpoint.split("//", 1)[1].split("/", 1)[0]
        with urllib.request.urlopen(f"http://{port}/json/list", timeout=self.timeout) as response:
            targets = json.loads(response.read())
        page = next(t for t in targets if t.get("type") == "page")
        self.socket = self._stack.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout))
        self.call("Page.enable")
        self.call("Runtime.enable")
        # The viewport is exactly width x height (--window-size counts the window, not the page).
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)

    def _devtools_endpoint(self) -> str:
        """Chromium prints 'DevTools listening on ws://...' on stderr once the port is open."""
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            for line in self.process.stderr:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        seen = []
        while True:
            try:
                line = lines.get(timeout=self.timeout)
            except queue.Empty:
                raise TimeoutError(f"chromium did not open its DevTools port: {''.join(seen)[-500:]}") from None
            if line is None:
                raise RuntimeError(f"chromium exited: {''.join(seen)[-500:]}")
            seen.append(line)
            if "DevTools listening on " in line:
                return line.split("DevTools listening on ", 1)[1].strip()

    def call(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result (events that arrive meanwhile are kept)."""
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=self.timeout))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            message = json.loads(self.socket.recv(timeout=self.timeout))
            if message.get("method") == method:
                return message
            self.events.append(message)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """The value of a JS expression (a promise is awaited); page exceptions raise RuntimeError."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"page error: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def key(self, key: str, down: bool, shift: bool = False) -> None:
        code, virtual, text = KEYS[key]
        params = {"type": "keyDown" if down else "keyUp", "key": key.upper() if shift and len(key) == 1 else key,
                  "code": code, "windowsVirtualKeyCode": virtual, "modifiers": 8 if shift else 0}
        if down and text:
            params["text"] = text
        self.call("Input.dispatchKeyEvent", **params)

    def press(self, key: str, shift: bool = False) -> None:
        """One key press (down, then up)."""
        self.key(key, True, shift)
        self.key(key, False, shift)

    def screenshot(self) -> bytes:
        """A PNG of the page as it is now."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        if self.socket is not None:
            with contextlib.suppress(Exception):  # the browser may already be gone
                self._stack.close()
            self.socket = None
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.profile, ignore_errors=True)
