"""Headless Chromium for end-to-end tests: a small W3C WebDriver client over chromedriver.

No selenium: chromedriver speaks plain JSON over HTTP, and talking to it directly keeps the
tests free of a driver manager that would try to download browsers. Usage::

    chromium, driver = require_browser()      # skip (locally) or fail (CI=true) when absent
    with Browser(chromium, driver, tmp_path) as b:
        b.open("http://127.0.0.1:5000/")
        b.wait_for("return document.body.innerText.includes('recover')")
        b.screenshot(tmp_path / "page.png")

broken_images(markdown, browser, tmp) renders a markdown file and lists the images that do not
load: the check a report's tests can reuse.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",)  # no DNS at all
INSTALL_HINT = "apt-get install chromium chromium-driver (.ci/run does this)"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    names = ("chromium", "chromium-browser", "google-chrome")
    chromium = next((p for p in map(shutil.which, names) if p), None)
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def require_browser() -> tuple[str, str]:
    """The browser paths; a skip with the reason when absent, but a failure on CI (CI=true)."""
    found = find_browser()
    if found is None:
        message = f"chromium and chromedriver not found: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{message}; CI must have them")
        pytest.skip(message)
    return found


class Browser:
    """One headless Chromium session driven through chromedriver's WebDriver endpoints."""

    def __init__(
        self,
        chromium: str,
        driver: str,
        tmp: Path,
        size: tuple[int, int] = (1400, 900),
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "chromedriver.log"
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}", f"--log-path={self.log}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.session = ""
        try:
            self._wait_ready()
            args = [*CHROMIUM_FLAGS, *extra_args, f"--user-data-dir={tmp / 'profile'}"]
            args.append(f"--window-size={size[0]},{size[1]}")
            options = {"binary": chromium, "args": args}
            caps = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
            self.session = self._call("POST", "/session", {"capabilities": caps})["sessionId"]
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"chromedriver did not start; see {self.log}")

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            value = json.loads(exc.read() or b"{}").get("value", {})
            raise RuntimeError(f"webdriver {method} {path}: {value.get('message', exc)}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self._call("POST", self._s("/url"), {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run a JavaScript function body in the page; return its value."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 60, what: str = "") -> Any:
        """Poll script until it returns something truthy; AssertionError with the page text."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.text()[:1500]
                raise AssertionError(f"timed out waiting for {what or script}; page: {text!r}")
            time.sleep(0.25)

    def text(self) -> str:
        """The rendered text of the page."""
        return self.run("return document.body ? document.body.innerText : '';")

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport."""
        png = base64.b64decode(self._call("GET", self._s("/screenshot")))
        path.write_bytes(png)
        return path

    def close(self) -> None:
        """End the session and chromedriver (which ends Chromium)."""
        if self.session:
            try:
                self._call("DELETE", self._s(""))
            except (OSError, RuntimeError):
                pass
            self.session = ""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def markdown_page(md: Path) -> str:
    """md as a standalone HTML page whose relative links resolve beside md (a <base> tag)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(md.read_text())
    base = html.escape(md.resolve().parent.as_uri() + "/")
    return f'<!DOCTYPE html><html><head><meta charset="utf-8"><base href="{base}"></head>' + (
        f"<body>{body}</body></html>"
    )


def broken_images(md: Path, browser: Browser, tmp: Path) -> tuple[int, list[str]]:
    """Render md in the browser; (number of <img>, the src of those that did not load)."""
    tmp.mkdir(parents=True, exist_ok=True)
    page = tmp / f"{md.stem}.html"
    page.write_text(markdown_page(md))
    browser.open(page.resolve().as_uri())
    browser.wait_for(
        "return Array.from(document.images).every(i => i.complete);", what="images to load"
    )
    count = browser.run("return document.images.length;")
    broken = browser.run(
        "return Array.from(document.images)"
        ".filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src'));"
    )
    return count, broken
