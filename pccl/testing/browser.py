"""A headless Chromium driven over the DevTools protocol, standard library only.

Chromium's ``--remote-debugging-pipe`` speaks the DevTools protocol on file
descriptors 3 (commands in) and 4 (replies and events out), one JSON object
per message, each ended by a NUL byte.  That is enough for a test to load a
page, read its live DOM while the page's own timers keep running, collect
the JavaScript errors it raised, and take a screenshot, without selenium or
a websocket client.

    with Browser.launch() as browser:
        page = browser.open("http://127.0.0.1:8080/")
        page.wait_for("document.body.dataset.updates > 0", timeout=10)
        html = page.dom()
        page.screenshot("build/artifacts/page.png")

:func:`find_chromium` finds the binary; :func:`ensure_chromium` installs
Debian's ``chromium`` package with apt-get when it is missing and the
process is root (what ``make test`` relies on).  Every wait is bounded.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_TIMEOUT = 900.0


class BrowserError(RuntimeError):
    """The browser died, did not answer in time, or a command failed."""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """The path of a Chromium binary, installing Debian's ``chromium`` with
    apt-get when there is none and we are root; ``(None, reason)`` when it
    cannot be had."""
    path = find_chromium()
    if path:
        return path, "found"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, "chromium is not installed and installing it needs root (apt-get)"
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "chromium is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [[apt, "install", "-y", "-qq", "chromium"]]
    out = ""
    for attempt in range(2):
        if attempt:  # the package lists may be missing or stale
            steps = [[apt, "update", "-qq"], [apt, "install", "-y", "-qq", "chromium"]]
        try:
            for argv in steps:
                proc = subprocess.run(
                    argv, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                    stdin=subprocess.DEVNULL,
                )
                out = (proc.stdout + proc.stderr)[-400:]
                if proc.returncode != 0:
                    break
        except subprocess.TimeoutExpired:
            return None, f"apt-get install chromium took longer than {INSTALL_TIMEOUT:g} s"
        path = find_chromium()
        if path:
            return path, "installed with apt-get"
    last = out.strip().splitlines()[-1] if out.strip() else "no output"
    return None, f"apt-get install chromium failed: {last}"


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: Browser, session: str, target: str):
        self.browser = browser
        self.session = session
        self.target = target

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression in the page (returned by value)."""
        reply = self.send(
            "Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in reply:
            raise BrowserError(f"evaluating {expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.1) -> None:
        """Poll ``expression`` until it is truthy in JavaScript's sense (an
        element is); BrowserError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = self.evaluate(f"Boolean({expression})")
            if last:
                return
            if time.monotonic() >= deadline:
                raise BrowserError(
                    f"page condition {expression!r} not met within {timeout:g} s (last: {last!r})"
                )
            time.sleep(interval)  # polling a condition with a deadline, not a synchronisation

    def dom(self) -> str:
        """The live DOM, serialised."""
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: str, full_page: bool = True) -> str:
        """Save a PNG of the page (its whole height with ``full_page``)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                      "scale": 1},
            )
        data = self.send("Page.captureScreenshot", **params)["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    @property
    def errors(self) -> list[str]:
        """JavaScript exceptions and console errors of this page so far."""
        return self.browser.page_errors(self.session)


class Browser:
    """A headless Chromium process and its DevTools pipe; :meth:`close`
    (or the end of a ``with`` block) kills it and removes its profile."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int,
                 profile: str):
        self.proc = proc
        self._wfd = to_browser
        self._rfd = from_browser
        self._profile = profile
        self._ids = iter(range(1, 1 << 62))
        self._replies: dict[int, dict] = {}
        self._errors: dict[str, list[str]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name="chromium-cdp")
        self._reader.start()
        self.size = (1280, 900)

    @classmethod
    def launch(cls, binary: str | None = None, width: int = 1280, height: int = 900) -> Browser:
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("no chromium binary found")
        profile = tempfile.mkdtemp(prefix="pccl-chromium-")
        # fds 3 and 4 of the child: it reads commands on 3, writes on 4.  Our
        # ends are moved above 9 (close-on-exec), then dup2'd onto 3 and 4
        # in the child; pass_fds=(3, 4) keeps those two across Popen's
        # closing of every other descriptor, which runs after preexec_fn.
        fds = os.pipe() + os.pipe()
        cmd_r, cmd_w, out_r, out_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
        for fd in fds:
            os.close(fd)
        argv = [
            binary, "--headless", "--remote-debugging-pipe", "--no-sandbox",
            "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--mute-audio",
            "--disable-background-networking", "--disable-component-update",
            "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "about:blank",
        ]

        def child_fds() -> None:
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(3, 4), preexec_fn=child_fds,
                start_new_session=True,
            )
        except BaseException:
            for fd in (cmd_r, cmd_w, out_r, out_w):
                os.close(fd)
            shutil.rmtree(profile, ignore_errors=True)
            raise
        os.close(cmd_r)
        os.close(out_w)
        browser = cls(proc, cmd_w, out_r, profile)
        try:
            browser.send("Browser.getVersion", timeout=60)
        except BaseException:
            browser.close()
            raise
        browser.size = (width, height)
        return browser

    # -- the pipe ----------------------------------------------------------

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(self._rfd, 1 << 20)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    self._dispatch(json.loads(raw))
        except OSError:
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _dispatch(self, msg: dict) -> None:
        if "id" in msg:
            with self._cond:
                self._replies[msg["id"]] = msg
                self._cond.notify_all()
            return
        method, params = msg.get("method"), msg.get("params", {})
        session = msg.get("sessionId", "")
        text = None
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            text = (d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in
                            params.get("args", []))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            text = f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip()
        if text is not None:
            with self._cond:
                self._errors.setdefault(session, []).append(text)

    def send(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float = 30.0) -> dict:
        cmd_id = next(self._ids)
        msg: dict[str, Any] = {"id": cmd_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        with self._write_lock:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._wfd, view)
                    view = view[n:]
            except OSError as exc:
                raise BrowserError(f"chromium is gone ({method}): {exc}") from None
        deadline = time.monotonic() + timeout
        with self._cond:
            while cmd_id not in self._replies:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise BrowserError(f"chromium exited before answering {method}")
                if remaining <= 0:
                    raise BrowserError(f"chromium did not answer {method} within {timeout:g} s")
                self._cond.wait(remaining)
            reply = self._replies.pop(cmd_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
        return reply.get("result", {})

    def page_errors(self, session: str) -> list[str]:
        with self._cond:
            return list(self._errors.get(session, []))

    # -- pages -------------------------------------------------------------

    def open(self, url: str, timeout: float = 30.0) -> Page:
        """A new tab at ``url``, loaded (its ``load`` event fired)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session, target)
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        width, height = self.size
        page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=url)
        page.wait_for(
            "document.readyState === 'complete' && location.href !== 'about:blank'", timeout
        )
        return page

    def close(self) -> None:
        """Kill the browser (its whole session), reap it, remove its profile."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except OSError:
                self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kernel problem
            pass
        try:
            os.close(self._wfd)
        except OSError:
            pass
        self._reader.join(5)  # EOF once every chromium process is gone
        try:
            os.close(self._rfd)
        except OSError:
            pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
