"""Load a local HTML file in Debian's headless chromium and report what a user would get: console
errors and uncaught exceptions, whether every image decoded, the SVG count, a full-page screenshot.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages,
NUL-terminated, chromium reads fd 3 and writes fd 4), so no websocket client is needed. Every wait
is for a message, bounded by a generous deadline. scripts/test.sh installs chromium when missing.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_PAGE_FACTS = """JSON.stringify({
  images: Array.from(document.images, i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt})),
  svgs: document.querySelectorAll('svg').length,
  title: document.title})"""


@dataclass
class PageReport:
    errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    svgs: int = 0
    title: str = ""
    screenshot: bytes = b""


class _DevTools:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int, timeout: float) -> None:
        self.proc, self.write_fd, self.read_fd, self.timeout = proc, write_fd, read_fd, timeout
        self.buffer, self.events, self.next_id = b"", [], 0

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.read_fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe (exit code {self.proc.poll()})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._message(deadline))


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            out.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in args))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            out.append(f"log: {params['entry'].get('text')}")
    return out


def load_page(path: Path, timeout: float = 90.0, width: int = 1280) -> PageReport:
    """Open `path` in headless chromium, wait for its load event, and report (see module doc)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("chromium is not on PATH (scripts/test.sh installs Debian's chromium)")
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="ntt-chromium-") as profile, tempfile.TemporaryFile() as log:
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', chromium, "--headless", "--no-sandbox",
               "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
               "--no-default-browser-check", "--disable-extensions", "about:blank"]
        proc = subprocess.Popen(cmd, pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_r)
        os.close(from_w)
        tools = _DevTools(proc, to_w, from_r, timeout)
        try:
            target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                tools.call(f"{domain}.enable", session=session)
            tools.call("Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
            tools.call("Page.navigate", {"url": path.resolve().as_uri()}, session)
            tools.wait_event("Page.loadEventFired", session)
            facts = json.loads(tools.call("Runtime.evaluate", {"expression": _PAGE_FACTS, "returnByValue": True},
                                          session)["result"]["value"])
            size = tools.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = tools.call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session)
        except (TimeoutError, RuntimeError) as exc:
            log.seek(0)
            raise RuntimeError(f"{exc}; chromium's output ends with:\n{log.read()[-3000:].decode(errors='replace')}")
        finally:
            with contextlib.suppress(OSError):      # the reply may never come: the browser exits
                os.write(to_w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_w)
            os.close(from_r)
    return PageReport(_errors(tools.events), facts["images"], facts["svgs"], facts["title"],
                      base64.b64decode(shot["data"]))
