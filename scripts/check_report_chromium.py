#!/usr/bin/env python3
"""Render an audit report in headless Chromium and fail if the screenshot is missing or blank.

Needs Debian's chromium (this script installs nothing):

    apt-get update && apt-get install -y chromium

Usage (from the repository, with the project's virtual environment for Pillow):

    python scripts/check_report_chromium.py RUN/report/report.html [--out shot.png] [--window-size 1280,3000]

Chromium runs offline (every host name resolves to nothing), so a report that needed the network would
render with holes. Exit status: 0 rendered, 1 missing or blank screenshot, 2 chromium or the report missing.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND"]


def find_chromium(given: str | None) -> str | None:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def screenshot(chromium: str, html: Path, out: Path, window: str, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="side-report-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={window}",
               html.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def blank_reason(png: Path) -> str | None:
    """Why the screenshot counts as blank, or None when it shows content."""
    if not png.is_file() or png.stat().st_size == 0:
        return f"no screenshot at {png}"
    img = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    inked = (img < 200).mean()
    if img.std() < 5 or inked < 0.005:
        return f"screenshot {png} is blank (std {img.std():.2f}, {100 * inked:.2f}% of pixels inked)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path, help="report.html to render")
    ap.add_argument("--out", type=Path, default=None, help="screenshot path (default: next to the report)")
    ap.add_argument("--window-size", default="1280,3000")
    ap.add_argument("--chromium", default=None, help="chromium binary (default: chromium on PATH)")
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    if not a.html.is_file():
        print(f"error: {a.html} does not exist", file=sys.stderr)
        return 2
    chromium = find_chromium(a.chromium)
    if chromium is None:
        print("error: chromium not found; install it with: apt-get install -y chromium", file=sys.stderr)
        return 2
    out = a.out or a.html.with_name("report-chromium.png")
    out.unlink(missing_ok=True)
    try:
        r = screenshot(chromium, a.html, out, a.window_size, a.timeout)
    except subprocess.TimeoutExpired:
        print(f"error: chromium took longer than {a.timeout:.0f} s", file=sys.stderr)
        return 1
    reason = blank_reason(out)
    if reason is not None:
        print(f"FAIL: {reason}\nchromium exit {r.returncode}; stderr tail:\n{r.stderr[-2000:]}", file=sys.stderr)
        return 1
    w, h = Image.open(out).size
    print(f"ok: {out} ({w}x{h})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
