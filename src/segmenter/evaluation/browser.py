"""Render a report in headless Chromium: check that it displays, and take screenshots of it.

A report is meant to be opened in a browser, so the only complete check of it is a browser's: every
figure must decode (``naturalWidth > 0``) and no table may be empty. The report itself has no JavaScript,
so :func:`check_report` renders a *copy* of it with a small checking script added; on the window's
``load`` event the script writes its verdict into the page as JSON, and Chromium's ``--dump-dom`` prints
the page, verdict included. No debugging port, no extra Python package: only the ``chromium`` program
(Debian package ``chromium``; ``make test`` installs it).

Chromium runs with a fresh profile in a temporary folder and with every background network feature off,
so a run reads nothing but the given file and leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from segmenter.artifacts import atomic_file

#: Program names tried in order when no path is given and SEGMENTER_CHROMIUM is not set.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
)
VERDICT_ID = "segmenter-browser-verdict"

# Runs on the window's load event, when every <img> has loaded or failed; writes a JSON verdict.
_CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (image) {
    return {alt: image.alt, complete: image.complete, naturalWidth: image.naturalWidth};
  });
  var tables = Array.prototype.map.call(document.querySelectorAll("table"), function (table) {
    var cells = table.querySelectorAll("tbody td");
    var filled = Array.prototype.filter.call(cells, function (cell) { return cell.textContent.trim() !== ""; });
    var heading = table.closest("section") ? table.closest("section").querySelector("h2") : null;
    return {section: heading ? heading.textContent : "", rows: table.querySelectorAll("tbody tr").length,
            filledCells: filled.length};
  });
  var verdict = document.createElement("pre");
  verdict.id = "%s";
  verdict.textContent = JSON.stringify({title: document.title, images: images, tables: tables,
                                        width: document.documentElement.scrollWidth,
                                        height: document.documentElement.scrollHeight});
  document.body.appendChild(verdict);
});
</script>
""" % VERDICT_ID


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not render the page; the message says which, on one line."""


@dataclasses.dataclass
class PageCheck:
    """What a browser saw of a page: every image and table, and the page size in CSS pixels."""

    title: str
    images: list[dict]
    tables: list[dict]
    width: int
    height: int

    @property
    def broken_images(self) -> list[str]:
        """Alt texts of the images that did not decode (``naturalWidth == 0``)."""
        return [image["alt"] for image in self.images if not image["complete"] or image["naturalWidth"] <= 0]

    @property
    def empty_tables(self) -> list[str]:
        """Section headings of the tables without a row holding text."""
        return [table["section"] for table in self.tables if table["rows"] == 0 or table["filledCells"] == 0]

    @property
    def ok(self) -> bool:
        return bool(self.images or self.tables) and not self.broken_images and not self.empty_tables

    def __str__(self) -> str:
        return (f"{len(self.images) - len(self.broken_images)}/{len(self.images)} images loaded, "
                f"{len(self.tables) - len(self.empty_tables)}/{len(self.tables)} tables with rows")


def find_chromium(executable: Optional[str] = None) -> str:
    """The path of a Chromium program: ``executable``, else $SEGMENTER_CHROMIUM, else the first on PATH.

    Raises
    ------
    BrowserError
        If none is found; the message says how to install it.
    """
    candidates = [executable] if executable else (
        [os.environ["SEGMENTER_CHROMIUM"]] if os.environ.get("SEGMENTER_CHROMIUM") else list(CHROMIUM_NAMES))
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(f"Chromium not found (tried {', '.join(candidates)}); install it with "
                       "`apt-get install chromium` (Debian/Ubuntu) or set SEGMENTER_CHROMIUM to its path")


def run_chromium(url: str, extra_flags: Sequence[str], *, executable: Optional[str] = None,
                 timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run headless Chromium once on ``url`` with a throw-away profile; return the finished process.

    Raises
    ------
    BrowserError
        If Chromium is missing, exits with an error or runs past ``timeout`` seconds.
    """
    program = find_chromium(executable)
    with tempfile.TemporaryDirectory(prefix="segmenter-chromium-") as profile:
        command = [program, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra_flags, url]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"{program} did not finish within {timeout:.0f} s on {url}") from None
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise BrowserError(f"{program} exited with status {result.returncode} on {url}: {last_line}")
    return result


def check_report(html_path: Path, *, executable: Optional[str] = None, timeout: float = 120.0) -> PageCheck:
    """Render ``html_path`` in headless Chromium and report what loaded.

    The page is copied into a temporary folder with a checking script added before ``</body>``; the
    original file is not changed. Images are checked by ``naturalWidth`` (0 for an image that failed to
    load or decode) and tables by their body rows and non-empty cells.

    Returns
    -------
    check : PageCheck
        ``check.ok`` is True when the page has content, every image decoded and no table is empty.

    Raises
    ------
    BrowserError
        If Chromium is missing or fails, or the page never reached its load event.
    """
    html_path = Path(html_path)
    page = html_path.read_text(encoding="utf-8")
    position = page.lower().rfind("</body>")
    checked = page[:position] + _CHECK_SCRIPT + page[position:] if position >= 0 else page + _CHECK_SCRIPT
    with tempfile.TemporaryDirectory(prefix="segmenter-page-check-") as folder:
        copy = Path(folder) / html_path.name
        copy.write_text(checked, encoding="utf-8")
        # The virtual time budget lets the load event (and the script it triggers) finish before the dump.
        result = run_chromium(copy.as_uri(), ["--dump-dom", "--virtual-time-budget=10000"],
                              executable=executable, timeout=timeout)
    match = re.search(rf'<pre id="{VERDICT_ID}">(.*?)</pre>', result.stdout, flags=re.S)
    if match is None:
        raise BrowserError(f"{html_path}: the page did not finish loading in Chromium (no verdict in the DOM)")
    verdict = json.loads(html.unescape(match.group(1)))
    return PageCheck(title=verdict["title"], images=verdict["images"], tables=verdict["tables"],
                     width=int(verdict["width"]), height=int(verdict["height"]))


def screenshot(html_path: Path, png_path: Path, *, window_size: tuple[int, int] = (1200, 1600),
               executable: Optional[str] = None, timeout: float = 120.0) -> Path:
    """Save a PNG of the top ``window_size`` (width, height in CSS pixels) of a page, as a browser shows it.

    Written under a temporary name and moved into place, so an earlier screenshot survives a failure.

    Raises
    ------
    BrowserError
        If Chromium is missing or fails, or writes no PNG.
    """
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    width, height = window_size
    with atomic_file(png_path) as tmp:
        # No --virtual-time-budget here: with it, Chromium 156 leaves the bottom of the window unpainted.
        # Chromium takes the screenshot after the load event, when the report's data-URI figures are in.
        run_chromium(html_path.as_uri(), [f"--screenshot={tmp.resolve()}", f"--window-size={width},{height}"],
                     executable=executable, timeout=timeout)
        if not tmp.is_file() or not tmp.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
            raise BrowserError(f"{html_path}: Chromium wrote no screenshot")
    return png_path
