"""The pages people look at, in a real browser (headless Chromium over the DevTools pipe).

Checks ``attnkit report``'s page and ``attnkit patterns``' page: every image decodes
(naturalWidth > 0), nothing but ``data:`` URIs and the page itself is requested, no
script or console error. A deliberately bad page must fail each check, so a checker
that passes everything is caught too.

Without Chromium these tests skip, unless ``ATTNKIT_REQUIRE_BROWSER=1`` (set by
``.ci/run``), in which case they fail: CI must not pass by not looking.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from attnkit.browser import PageCheck, check_page, find_chromium, main
from attnkit.lab.report import run_experiments, write_report
from attnkit.layers import TinyLM
from attnkit.patterns import capture, repeated_tokens, write_page

PNG = b"\x89PNG\r\n\x1a\n"
REQUIRED = os.environ.get("ATTNKIT_REQUIRE_BROWSER") == "1"

pytestmark = pytest.mark.skipif(
    find_chromium() is None and not REQUIRED,
    reason="no Chromium on this machine (apt-get install chromium); CI sets "
    "ATTNKIT_REQUIRE_BROWSER=1 and fails instead of skipping",
)


@pytest.fixture(autouse=True)
def _chromium_present() -> None:
    if find_chromium() is None:
        pytest.fail("ATTNKIT_REQUIRE_BROWSER=1 but no Chromium found (apt-get install chromium)")


def test_the_checker_catches_a_bad_page(tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body>"
        "<img src='http://example.com/x.png'>"  # network
        "<img src='data:image/png;base64,AAAA'>"  # does not decode
        "<script>throw new Error('boom')</script>"  # script error
        "<script>console.error('oops')</script>"
        "</body></html>"
    )
    check = check_page(page)
    assert not check.ok
    assert check.external_requests == ["http://example.com/x.png"]
    assert len(check.broken_images) == 2
    assert any("boom" in e for e in check.errors) and any("oops" in e for e in check.errors)
    assert main([str(page)]) == 1


def _assert_renders(page: Path, figures: int, tmp_path: Path) -> PageCheck:
    shot = tmp_path / "shot.png"
    check = check_page(page, screenshot=shot)
    assert check.ok, check.summary()
    assert len(check.images) == figures, check.summary()
    assert all(i["width"] > 100 and i["height"] > 100 for i in check.images), check.images
    assert all(u.startswith("data:image/png") or u == check.url for u in check.requests)
    assert shot.read_bytes()[:8] == PNG
    return check


@pytest.mark.slow
def test_the_report_page_renders(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = run_experiments(["patterns"], "test", out, show_progress=False)
    index, _ = write_report(run, out)
    _assert_renders(index, len(run.results[0].figures), tmp_path)


def test_the_patterns_page_renders(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM(vocab=30, d_model=16, n_layers=2, n_heads=2, max_len=32)
    maps = capture(model, repeated_tokens(2, 8, 30))
    index = write_page(maps, tmp_path / "page", title="patterns <check>")
    figures = len(list((tmp_path / "page").glob("*.png")))
    check = _assert_renders(index, figures, tmp_path)
    assert check.title == "patterns <check>"
