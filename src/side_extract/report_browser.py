"""The report in a real browser: headless Chromium (Debian's ``chromium``) opens ``report.html`` offline.

:func:`check_report` copies the report with a small probe script injected at the top of ``<head>`` that
records console errors and uncaught exceptions, then, after the page has loaded, counts the images that
decoded (``naturalWidth > 0``), the tables and the figures, and writes its findings into the DOM, which
Chromium prints with ``--dump-dom``. A screenshot is taken too and must not be blank. Every host name
resolves to nothing, so a report that needed the network would show it; links to external URLs in
``src``/``href`` are listed from the HTML itself.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000"]

PROBE = """<script>
window.__sideErrors = [];
window.addEventListener('error', e => window.__sideErrors.push('error: ' + (e.message || e.type)), true);
window.addEventListener('unhandledrejection', e => window.__sideErrors.push('rejection: ' + e.reason));
(function () {
  const orig = console.error;
  console.error = function (...a) { window.__sideErrors.push('console.error: ' + a.join(' ')); orig.apply(console, a); };
})();
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = {
    errors: window.__sideErrors,
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40)),
    no_alt: imgs.filter(i => !i.alt).length,
    tables: document.querySelectorAll('table').length,
    figures: document.querySelectorAll('img.fig').length,
    sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),
  };
  const pre = document.createElement('pre');
  pre.id = '__side_check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", re.I)


@dataclasses.dataclass(frozen=True)
class BrowserCheck:
    """What Chromium saw. ``ok`` is True when nothing is wrong."""

    chromium: str
    errors: list[str]
    images: int
    broken_images: list[str]
    images_without_alt: int
    tables: int
    figures: int
    sections: list[str]
    external_urls: list[str]
    screenshot: Path | None
    blank_reason: str | None

    @property
    def ok(self) -> bool:
        return (not self.errors and not self.broken_images and not self.external_urls and self.images > 0
                and self.tables > 0 and self.blank_reason is None)


def find_chromium(given: str | None = None) -> str | None:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def blank_reason(png: Path) -> str | None:
    """Why a screenshot counts as blank, or None when it shows content."""
    from PIL import Image

    if not png.is_file() or png.stat().st_size == 0:
        return f"no screenshot at {png}"
    img = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    inked = (img < 200).mean()
    if img.std() < 5 or inked < 0.005:
        return f"screenshot {png} is blank (std {img.std():.2f}, {100 * inked:.2f}% of pixels inked)"
    return None


def _run(chromium: str, args: list[str], url: str, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="side-report-chromium-") as profile:
        try:
            return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args, url], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:  # (a bare TimeoutExpired, not the documented ValueError)
            raise ValueError(f"chromium ({chromium}) did not finish within {timeout:g} s") from None
        except OSError as e:  # (not executable, not a program)
            raise ValueError(f"chromium ({chromium}) could not be started: {e}") from None


def check_report(html: str | Path, *, chromium: str | None = None, screenshot: str | Path | None = None,
                 window_size: str = "1280,3000", timeout: float = 120.0) -> BrowserCheck:
    """Open ``html`` in headless Chromium and report what it saw (see the module docstring).

    Raises ``ValueError`` when the report or Chromium is missing, or Chromium fails to print the page.
    """
    html = Path(html)
    if not html.is_file():
        raise ValueError(f"report {str(html)!r} " + ("is a directory, not a report.html" if html.is_dir()
                                                    else "does not exist"))
    shot = Path(screenshot) if screenshot is not None else html.with_name("report-chromium.png")
    if shot.is_dir() or not shot.parent.is_dir():  # (chromium wrote nothing, blamed on the report; a folder was
        # IsADirectoryError)
        raise ValueError(f"screenshot {str(shot)!r}: " + ("is a directory; give a file path such as shot.png"
                                                          if shot.is_dir() else f"its folder {str(shot.parent)!r} "
                                                          "does not exist"))
    exe = find_chromium(chromium)
    if exe is None:
        raise ValueError(f"chromium {chromium!r} not found" if chromium else
                         "chromium not found; install it with: apt-get install -y chromium")
    text = html.read_text(encoding="utf-8")
    external = sorted(set(m.group(0) for m in EXTERNAL.finditer(text)))
    with tempfile.TemporaryDirectory(prefix="side-report-probe-") as tmp:
        probed = Path(tmp) / html.name
        probed.write_text(text.replace("<head>", "<head>\n" + PROBE, 1) if "<head>" in text else PROBE + text,
                          encoding="utf-8")
        r = _run(exe, ["--dump-dom"], probed.resolve().as_uri(), timeout)
    m = re.search(r'<pre id="__side_check">(.*?)</pre>', r.stdout, flags=re.S)
    if m is None:
        raise ValueError(f"chromium printed no probe result (exit {r.returncode}); stderr tail:\n{r.stderr[-1500:]}")
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    shot.unlink(missing_ok=True)
    _run(exe, [f"--screenshot={shot}", f"--window-size={window_size}"], html.resolve().as_uri(), timeout)
    return BrowserCheck(exe, found["errors"], found["images"], found["broken"], found["no_alt"], found["tables"],
                        found["figures"], found["sections"], external, shot if shot.is_file() else None,
                        blank_reason(shot))
