"""Look at a page the way a reader does: headless Chromium, driven over the DevTools pipe.

attnkit's pages (``attnkit report``'s ``index.html``, ``attnkit patterns``' page) are
meant to be opened from a file, offline. :func:`check_page` loads one in headless
Chromium and reports what a reader would meet: whether every image decoded (its
``naturalWidth`` > 0), every request the page made (anything but ``data:`` URIs and
the page itself means it reaches for the network), and every script error or console
error. It can also save a full-page screenshot. From the shell::

    python -m attnkit.browser report/index.html --screenshot report.png

How: Chromium is started with ``--remote-debugging-pipe`` and spoken to with the
Chrome DevTools Protocol (JSON messages separated by NUL bytes on file descriptors 3
and 4), using only the standard library: no websocket client, no Playwright or
Selenium, no browser download. DNS is mapped to nowhere
(``--host-resolver-rules``), so a page that tries the network fails to load that
resource instead of fetching it, and the attempt is still reported.

Needs a Chromium binary: ``chromium`` (Debian's package), ``chromium-browser``,
``google-chrome``, or the path in ``$ATTNKIT_CHROMIUM``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_FLAGS", "BrowserError", "PageCheck", "check_page", "find_chromium", "main"]

#: Flags that work headless, as root, in a container, without a GPU or a network.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """Chromium could not be found, started, or did not answer in time."""


def find_chromium() -> str | None:
    """The Chromium executable: ``$ATTNKIT_CHROMIUM``, else the first one on PATH."""
    env = os.environ.get("ATTNKIT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageCheck:
    """What loading one page showed."""

    url: str
    images: list[dict[str, Any]] = field(default_factory=list)  # src, complete, width, height
    requests: list[str] = field(default_factory=list)  # every URL the page requested
    errors: list[str] = field(default_factory=list)  # exceptions, console and log errors
    title: str = ""
    screenshot: Path | None = None

    @property
    def external_requests(self) -> list[str]:
        """Requests for anything but a ``data:`` URI or the page itself."""
        return [
            u for u in self.requests if not u.startswith("data:") and u.split("#")[0] != self.url
        ]

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """Images that did not decode (not complete, or naturalWidth 0)."""
        return [i for i in self.images if not i["complete"] or i["width"] <= 0]

    @property
    def ok(self) -> bool:
        """Every image decoded, nothing was fetched from elsewhere, no error occurred."""
        return not self.broken_images and not self.external_requests and not self.errors

    def summary(self) -> str:
        """A few lines for a person (or a test failure message)."""
        lines = [
            f"{self.url}: title {self.title!r}, {len(self.images)} images "
            f"({len(self.broken_images)} broken), {len(self.requests)} requests "
            f"({len(self.external_requests)} external), {len(self.errors)} errors"
        ]
        lines += [f"  broken image: {i['src']}" for i in self.broken_images]
        lines += [f"  external request: {u}" for u in self.external_requests]
        lines += [f"  error: {e}" for e in self.errors]
        if self.screenshot is not None:
            lines.append(f"  screenshot: {self.screenshot}")
        return "\n".join(lines)


class _DevTools:
    """One Chromium process and its DevTools pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, executable: str, timeout: float) -> None:
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="attnkit-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # A small Python trampoline moves the child's ends onto fds 3 and 4, where
        # Chromium expects them, and execs it: no preexec_fn (unsafe in threaded parents
        # such as torch's), and no shell (POSIX sh only redirects fds 0-9).
        trampoline = (
            "import fcntl, os, sys; r0, w0 = int(sys.argv[1]), int(sys.argv[2]); "
            "r, w = (fcntl.fcntl(f, fcntl.F_DUPFD, 10) for f in (r0, w0)); "
            "[os.close(f) for f in (r0, w0)]; os.dup2(r, 3); os.dup2(w, 4); "
            "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])"
        )
        args = [
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self._profile.name}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    trampoline,
                    str(to_child_r),
                    str(from_child_w),
                    executable,
                    *args,
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as err:
            self._profile.cleanup()
            raise BrowserError(f"could not start {executable}: {err}") from err
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._profile.cleanup()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer within {self.timeout:g} s")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (status {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Send one command and wait for its reply (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str) -> None:
        """Wait until the event ``method`` arrives for ``session``."""
        deadline = time.monotonic() + self.timeout
        while not any(e["method"] == method and e.get("sessionId") == session for e in self.events):
            message = self._read_message(deadline)
            if "method" in message:
                self.events.append(message)


@contextlib.contextmanager
def _browser(executable: str | None, timeout: float) -> Iterator[_DevTools]:
    exe = executable or find_chromium()
    if exe is None:
        raise BrowserError(
            "no Chromium found (tried $ATTNKIT_CHROMIUM, " + ", ".join(_CANDIDATES) + "); on "
            "Debian: apt-get install chromium"
        )
    tools = _DevTools(exe, timeout)
    try:
        yield tools
    finally:
        tools.close()


_IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
    src: (i.currentSrc || i.src).slice(0, 60), complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight})))"""


def check_page(
    page: str | os.PathLike[str],
    *,
    screenshot: str | os.PathLike[str] | None = None,
    width: int = 1280,
    executable: str | None = None,
    timeout: float = 60.0,
) -> PageCheck:
    """Load ``page`` (an HTML file) in headless Chromium and report what happened.

    The page is loaded in a ``width``-pixel-wide window; after its load event the
    images are inspected and, with ``screenshot``, the whole page is saved as a PNG.
    Raises :class:`BrowserError` when Chromium is missing or does not answer within
    ``timeout`` seconds, FileNotFoundError when the page does not exist.
    """
    path = Path(page).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such page: {path}")
    url = path.as_uri()
    check = PageCheck(url=url)
    with _browser(executable, timeout) as tools:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Network", "Log"):
            tools.send(f"{domain}.enable", session=session)
        tools.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        tools.events.clear()
        tools.send("Page.navigate", {"url": url}, session=session)
        tools.wait_for("Page.loadEventFired", session)
        images = tools.send(
            "Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True}, session=session
        )
        check.images = json.loads(images["result"]["value"])
        title = tools.send(
            "Runtime.evaluate",
            {"expression": "document.title", "returnByValue": True},
            session=session,
        )
        check.title = str(title["result"].get("value", ""))
        if screenshot is not None:
            metrics = tools.send("Page.getLayoutMetrics", session=session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = tools.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {
                        "x": 0,
                        "y": 0,
                        "width": max(1, int(size["width"])),
                        "height": max(1, int(size["height"])),
                        "scale": 1,
                    },
                },
                session=session,
            )
            target_png = Path(screenshot)
            target_png.parent.mkdir(parents=True, exist_ok=True)
            target_png.write_bytes(base64.b64decode(shot["data"]))
            check.screenshot = target_png
        for event in tools.events:
            method, params = event["method"], event.get("params", {})
            if method == "Network.requestWillBeSent":
                check.requests.append(str(params["request"]["url"]))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                check.errors.append(f"exception: {text}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                args = " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params["args"]
                )
                check.errors.append(f"console.error: {args}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                check.errors.append(f"log: {params['entry'].get('text')}")
    return check


def main(argv: list[str] | None = None) -> int:
    """``python -m attnkit.browser PAGE [--screenshot PNG]``: exit status 1 if the page fails."""
    parser = argparse.ArgumentParser(
        prog="python -m attnkit.browser",
        description="Load an HTML page in headless Chromium: images, requests, errors.",
    )
    parser.add_argument("page", help="the HTML file")
    parser.add_argument("--screenshot", help="save a full-page PNG here")
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels")
    args = parser.parse_args(argv)
    try:
        check = check_page(args.page, screenshot=args.screenshot, width=args.width)
    except (BrowserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(check.summary())
    return 0 if check.ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
