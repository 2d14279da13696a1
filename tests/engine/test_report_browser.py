"""A report page in a real browser: headless Chromium renders it (screenshot not blank) and runs its
gallery filter (the DOM after load hides all but the worst N). Skips where no Chromium is installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from wsss_domains.domains.contract import LabelSpace
from wsss_domains.evaluation import EvaluationReport
from wsss_domains.reports.browser import dump_dom, find_browser, screenshot
from wsss_domains.reports.html import GalleryItem, evaluation_section, gallery, page
from wsss_domains.reports.pictures import colours

WIDTH, HEIGHT = 1000, 1400
SHOWN, ITEMS = 3, 5
LS = LabelSpace(classes=("bg", "tumour", "stroma"), palette=((40, 40, 40), (230, 30, 30), (30, 90, 230)))


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        pytest.skip("no Chromium / Chrome installed")
    return path


def write_page(path: Path) -> Path:
    confusion = torch.tensor([[50, 5, 5], [10, 30, 0], [0, 20, 40]])
    report = EvaluationReport.from_confusion(confusion, LS.classes, (0, 1, 2), n_images=ITEMS)
    items = []
    for i in range(ITEMS):
        picture = Image.new("RGB", (64, 64), (40 * i, 120, 255 - 40 * i))
        items.append(GalleryItem(f"image-{i}", i / ITEMS, [("image", picture), ("prediction", picture)]))
    path.write_text(
        page("browser test", evaluation_section(report, colours(LS)), gallery(items, shown=SHOWN))
    )
    return path


def test_report_renders_and_its_filter_shows_the_worst_n(browser: str, tmp_path: Path) -> None:
    html = write_page(tmp_path / "report.html")
    png = screenshot(browser, html, tmp_path / "shot.png", WIDTH, HEIGHT)
    with Image.open(png) as shot:
        assert shot.size == (WIDTH, HEIGHT)
        colours_seen = shot.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours_seen) > 20  # text, bars, coloured confusion cells, pictures: not a blank page

    dom = dump_dom(browser, html)
    figures = re.findall(r"<figure[^>]*>", dom)
    assert len(figures) == ITEMS
    assert len([f for f in figures if "hidden" not in f]) == SHOWN  # the script ran: only the worst N show
    assert f"{SHOWN} of {ITEMS} shown" in dom
