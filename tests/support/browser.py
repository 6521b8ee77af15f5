"""Headless Chromium driven over the DevTools protocol, to look at the Prefect UI as a person would.

The Prefect UI is a single-page app: its content appears after JavaScript has
fetched from the API, so a one-shot ``--dump-dom`` can race it. The DevTools
protocol lets a test wait for what a person would wait for (a table on the
page), read the text they would read and save the screenshot they would see.
Debian's ``chromium`` package; flags as the environment notes require.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def chromium_binary() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium process on loopback, and a page attached to it."""

    def __init__(self, profile_dir: Path, width: int = 1440, height: int = 1000):
        self.profile_dir = profile_dir
        self.width, self.height = width, height
        self.process: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._ids = itertools.count(1)
        self.session_id: str | None = None
        self.console: list[str] = []

    # ---- lifecycle -----------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> Chromium:
        from websockets.sync.client import connect

        binary = chromium_binary()
        if binary is None:
            raise BrowserError("chromium is not installed (apt-get install -y chromium)")
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a stale one from an earlier browser would mislead us
        log = open(self.profile_dir / "chromium.log", "wb")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile_dir}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log_path = self.profile_dir / "chromium.log"
                raise BrowserError(f"chromium did not start; see {log_path}")
            time.sleep(0.1)
        try:
            port, path = port_file.read_text().splitlines()[:2]
            self._ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30)
            target = self.send("Target.createTarget", url="about:blank", browser=True)
            self.session_id = self.send("Target.attachToTarget", targetId=target["targetId"],
                                        flatten=True, browser=True)["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=self.width,
                      height=self.height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):  # closing a socket to a dying browser
                self._ws.close()
            self._ws = None
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=15)

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- protocol ------------------------------------------------------------
    def send(self, method: str, browser: bool = False, timeout_s: float = 60.0,
             **params: Any) -> dict[str, Any]:
        """One DevTools command; events arriving meanwhile are kept only as console text."""
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if not browser and self.session_id:
            message["sessionId"] = self.session_id
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no answer to {method} within {timeout_s:.0f}s")
            reply = json.loads(self._ws.recv(timeout=remaining))
            if reply.get("method") == "Runtime.consoleAPICalled":
                args = reply["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", "")) for a in args))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    # ---- what a person does ----------------------------------------------------
    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout_s: float = 60.0) -> str:
        """Wait until the visible page text holds every needle; returns that text."""
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(needle in text for needle in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise BrowserError(f"page never showed {missing}; it showed:\n{text[:3000]}")

    def click_text(self, label: str) -> bool:
        """Click the innermost visible element whose own text is ``label`` (a tab, a link)."""
        script = f"""
        (() => {{
          const want = {json.dumps(label)};
          const all = [...document.querySelectorAll('a, button, [role=tab], span, div, li')];
          const size = e => e.querySelectorAll('*').length;
          const hit = all.filter(e => e.offsetParent !== null && e.textContent.trim() === want)
                         .sort((a, b) => size(a) - size(b))[0];
          if (!hit) return false;
          hit.click();
          return true;
        }})()
        """
        return bool(self.evaluate(script))

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path
