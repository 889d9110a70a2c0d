#!/usr/bin/env python3
"""Open an audit report in headless Chromium: console errors, images that fail to decode, missing tables or
figures, external URLs, a blank screenshot (``side_extract.report_browser``; the test suite runs the same
check on a report it makes).

Needs Debian's chromium (this script installs nothing): ``apt-get update && apt-get install -y chromium``.

    .venv/bin/python scripts/check_report_chromium.py RUN/report/report.html [--out shot.png]

Exit status: 0 all good, 1 something wrong (printed), 2 chromium or the report missing.
"""
from __future__ import annotations

import argparse
import sys

from side_extract.report_browser import check_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", help="report.html to open")
    ap.add_argument("--out", default=None, help="screenshot path (default: next to the report)")
    ap.add_argument("--window-size", default="1280,3000")
    ap.add_argument("--chromium", default=None, help="chromium binary (default: chromium on PATH)")
    a = ap.parse_args(argv)
    try:
        c = check_report(a.html, chromium=a.chromium, screenshot=a.out, window_size=a.window_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"images {c.images} (broken {len(c.broken_images)}, without alt text {c.images_without_alt}), "
          f"tables {c.tables}, figures {c.figures}, console errors {len(c.errors)}, external URLs "
          f"{len(c.external_urls)}; screenshot {c.screenshot}")
    for what in (c.errors, c.broken_images, c.external_urls, [c.blank_reason] if c.blank_reason else []):
        for line in what:
            print(f"  {line}")
    return 0 if c.ok else 1


if __name__ == "__main__":
    sys.exit(main())
