"""Opening a report in headless Chromium: a screenshot, or the DOM after its scripts ran.

Reports are checked in a real browser (their gallery filter is JavaScript) and the demo report's
screenshot is recorded in the docs. Chromium runs offline-minded: a throw-away profile, no
background traffic, no GPU, no sandbox (so it also runs as root in a container).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
TIMEOUT_S = 120
# Appended to a copy of the page: records the laid-out height where --dump-dom can read it.
_HEIGHT_PROBE = (
    "<script>document.body.setAttribute('data-page-height', "
    "Math.ceil(document.documentElement.scrollHeight));</script>"
)


def find_browser() -> str | None:
    """The first Chromium or Chrome on ``PATH``; None where there is none."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _run(browser: str, *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="wsss-chromium-") as profile:
        done = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=True,
        )
    return done.stdout


def screenshot(browser: str, page: Path, png: Path, width: int, height: int) -> Path:
    """A ``width`` x ``height`` PNG of ``page`` as the browser lays it out in a window that size."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    window = (f"--window-size={width},{height}", "--hide-scrollbars")
    _run(browser, *window, f"--screenshot={png}", Path(page).resolve().as_uri())
    if not png.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot to {png}")
    return png


def dump_dom(browser: str, page: Path, width: int = 1200, height: int = 1600) -> str:
    """The document after load (scripts run), serialised."""
    return _run(browser, f"--window-size={width},{height}", "--dump-dom", Path(page).resolve().as_uri())


def page_height(browser: str, page: Path, width: int) -> int:
    """How tall ``page`` lays out at ``width``: for a full-page screenshot."""
    with tempfile.TemporaryDirectory(prefix="wsss-page-") as folder:
        probe = Path(folder) / "page.html"
        probe.write_text(Path(page).read_text().replace("</body>", _HEIGHT_PROBE + "</body>", 1))
        dom = dump_dom(browser, probe, width)
    found = re.search(r'data-page-height="(\d+)"', dom)
    if found is None:
        raise RuntimeError(f"{browser} did not lay out {page}")
    return int(found.group(1))
