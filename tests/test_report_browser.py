"""The report opened in headless Chromium (Debian's chromium; `.ci/run` installs it): no console errors, every
image decodes and has alt text, tables and figures present, no external URL, a screenshot that is not blank."""
from __future__ import annotations

import pytest

from side_extract.pipeline import run_audit
from side_extract.report import write_report
from side_extract.report_browser import check_report, find_chromium

from test_pipeline import tiny_rc

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install -y "
                                "chromium; .ci/run installs it): the report was not opened in a browser")


def test_report_in_headless_chromium(tiny_model_dir, tmp_path, one_thread):
    run_audit(tmp_path / "run", tiny_rc(tiny_model_dir))
    html = write_report(tmp_path / "run")
    c = check_report(html)
    assert c.errors == [] and c.broken_images == [] and c.external_urls == [], c
    assert c.images >= 10 and c.images_without_alt == 0
    assert c.tables >= 3 and c.figures >= 2
    assert {"null"} <= set(c.sections)
    assert c.blank_reason is None and c.ok


def test_the_check_fails_on_a_broken_report(tmp_path):
    bad = tmp_path / "report.html"
    bad.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><table></table>"
                   "<img src='data:image/png;base64,AAAA' alt='broken'>"
                   "<img src='https://example.org/x.png' alt='remote'><script>undefinedFunction()</script></body></html>")
    c = check_report(bad)
    assert not c.ok
    assert any("undefinedFunction" in e for e in c.errors)
    assert "broken" in c.broken_images and "remote" in c.broken_images
    assert c.external_urls
