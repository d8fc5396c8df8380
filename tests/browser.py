"""A headless Chromium driven over the DevTools protocol on a pipe (standard library only), for page tests.

`open_page(path)` loads a local HTML file in a 1366 x 768 window and returns what a person would notice:
the console errors and uncaught exceptions, the images that did not load, the links that lead nowhere, and a
screenshot. Chromium comes from Debian's `chromium` package (`.ci/run` installs it); `find_chromium()` is
None where it is absent, and the tests skip.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1366, 768)

_CHECK_JS = """JSON.stringify({
  images: Array.from(document.images).map(
    i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  anchors: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  scrollWidth: document.documentElement.scrollWidth,
  title: document.title,
})"""


def find_chromium() -> str | None:
    """The path of a Chromium binary, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclasses.dataclass
class PageCheck:
    """What loading a page showed."""

    console_errors: list[str]
    broken_images: list[str]
    dead_links: list[str]
    images: int
    links: int
    scroll_width: int
    title: str
    screenshot: bytes
    script_result: object = None


class _Pipe:
    """DevTools messages: JSON objects separated by NUL bytes, on the browser's fds 3 (in) and 4 (out)."""

    def __init__(self, binary: str, profile: str):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds():  # the browser reads commands on fd 3 and answers on fd 4 (kept open: pass_fds)
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        args = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--allow-file-access-from-files",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            preexec_fn=fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=60.0) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


def _dead_links(links: list[str], anchors: set[str], page_url: str) -> list[str]:
    """Links to a missing local file or to an anchor the page lacks; any other scheme is dead here too
    (a report must work offline)."""
    dead = []
    for link in links:
        url = urllib.parse.urlparse(link)
        if url.scheme != "file":
            dead.append(link)
            continue
        path = urllib.request.url2pathname(url.path)
        if link.split("#")[0] == page_url.split("#")[0]:
            if url.fragment and url.fragment not in anchors:
                dead.append(link)
        elif not os.path.exists(path):
            dead.append(link)
    return dead


def open_page(path: str, binary: str, script: str | None = None, timeout: float = 120.0) -> PageCheck:
    """Loads the HTML file at `path` and reports what it showed (see PageCheck); `script`, a JavaScript
    expression run after the checks (a click...), gives `script_result`."""
    url = "file://" + urllib.request.pathname2url(os.path.abspath(path))
    with tempfile.TemporaryDirectory() as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for method in ("Page.enable", "Runtime.enable", "Log.enable"):
                pipe.send(method, session=session)
            pipe.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            pipe.send("Page.navigate", {"url": url}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout)
            found = json.loads(
                pipe.send(
                    "Runtime.evaluate", {"expression": _CHECK_JS, "returnByValue": True}, session=session
                )["result"]["value"]
            )
            result = None
            if script:
                evaluated = pipe.send(
                    "Runtime.evaluate", {"expression": script, "returnByValue": True}, session=session
                )
                result = evaluated["result"].get("value")
            shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session, timeout=timeout)
        finally:
            pipe.close()
    errors = []
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params.get("exceptionDetails", {}))[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args", []))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(params["entry"].get("text", "")[:300])
    return PageCheck(
        console_errors=errors,
        broken_images=[i["src"] for i in found["images"] if not i["ok"]],
        dead_links=_dead_links(found["links"], set(found["anchors"]), url),
        images=len(found["images"]),
        links=len(found["links"]),
        scroll_width=int(found["scrollWidth"]),
        title=found["title"],
        screenshot=base64.b64decode(shot["data"]),
        script_result=result,
    )
