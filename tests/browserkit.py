"""A real browser for the UI tests: headless Chromium (Debian's `chromium`) driven over the DevTools protocol.

`Browser().open(url, expect=[...])` loads a page and waits, in real time, until its visible text
(`document.body.innerText`) holds every expected string, then returns that text; `click(text)` presses the
element whose own text is `text` (a tab, a link); `screenshot(path)` writes a PNG of the window. The protocol
client is a few lines over `websockets` (already installed with Prefect): no browser download, no driver.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM:
        if path := shutil.which(name):
            return path
    return None


class Browser:
    def __init__(self, width: int = 1500, height: int = 1000, timeout: float = 60.0):
        from websockets.sync.client import connect

        exe = find_chromium()
        if exe is None:
            raise RuntimeError("no chromium on PATH")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="qabot-chromium-")
        self.proc = subprocess.Popen(
            [
                exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--no-first-run", "--mute-audio",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                f"--window-size={width},{height}", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        ws_url = None
        deadline = time.monotonic() + 60
        while ws_url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                ws_url = m.group(1)
        if ws_url is None:
            self.close()
            raise RuntimeError("chromium did not open its DevTools port")
        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=30)
        self._id = 0
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._send("Page.enable", session=True)
        self._send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False,
        }, session=True)  # fmt: skip

    def _send(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=self.timeout))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self._send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expect: list[str], timeout: float | None = None) -> str:
        """The page's visible text once it holds every string of `expect`; AssertionError naming the missing
        ones (and the text seen) after `timeout` seconds."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            text = self.text()
            missing = [e for e in expect if e not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def open(self, url: str, expect: list[str], timeout: float | None = None) -> str:
        self._send("Page.navigate", {"url": url}, session=True)
        return self.wait_for(expect, timeout)

    def click(self, text: str) -> None:
        """Click, with the mouse, the innermost visible element whose text is exactly `text` (a tab, a button, a
        link): a press and a release at its centre, as a person's click (some tabs switch on the press)."""
        box = self.evaluate(
            "(() => { const want = " + json.dumps(text) + ";"
            " const all = [...document.querySelectorAll('body *')]"
            "   .filter(e => e.offsetParent !== null && e.innerText && e.innerText.trim() === want);"
            " const inner = all.filter(e => !all.some(o => o !== e && e.contains(o)));"
            " if (!inner.length) return null; inner[0].scrollIntoView({block: 'center'});"
            " const r = inner[0].getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if not box:
            raise AssertionError(f"nothing to click named {text!r}; the page shows:\n{self.text()[:2000]}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self._send("Input.dispatchMouseEvent", {
                "type": kind, "x": box[0], "y": box[1], "button": "left", "buttons": 1, "clickCount": 1,
            }, session=True)  # fmt: skip

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self._send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
