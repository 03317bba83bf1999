"""The self-contained HTML report: its markup (always), and the page in a real headless Chromium.

The browser tests drive Debian's `chromium` + `chromium-driver` (installed by `.ci/run`) through
selenium with the driver path given explicitly, so selenium-manager never downloads anything. They
skip, saying why, only where the browser, its driver or selenium is missing.
"""
from __future__ import annotations

import base64
import webbrowser
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adadiff_bench.errors import UserError
from adadiff_bench.report.html import (HtmlFigure, HtmlSection, HtmlTable, open_in_browser,
                                         write_html_report)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = "<script>alert('x')</script> & co"
FID = "FID [digits_cnn] ↓"
BOARD = pd.DataFrame({
    "method setting": ["adadiff (threshold=0.5)", "full (ddim 10 steps)", "static-exit (exit=3)"],
    FID: [10.2, 9.5, 100.0],  # a text sort would put 10.2 < 100.0 < 9.5
    "GFLOPs/image ↓": [1.25, 2.5, 0.4],
    "IS ↑": [2.1, np.nan, 3.3],
    "ΔFID vs full": [-1.5, -10.2, 4.1],  # a collator's "numeric" text order would put -1.5 before -10.2
    "Pareto": ["★", "★", ""],
})


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", size, "white")
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
    image.save(path)
    return path


def build_report(tmp: Path) -> tuple[Path, list[Path]]:
    """Two sections, a leaderboard with a NaN and a hostile caption, two PNG figures."""
    figures = [_png(tmp / "curve.png", (320, 200), (0, 114, 178)), _png(tmp / "grid.png", (96, 96), (213, 94, 0))]
    sections = [
        HtmlSection("Leaderboard", text="One row per method setting.\n\nFLOPs = 2 x MACs; `full` is the reference.",
                    tables=[HtmlTable(f"Leaderboard {HOSTILE}", BOARD, table_id="leaderboard", notes="n = 64.")]),
        HtmlSection("Figures & samples", figures=[HtmlFigure("FID vs GFLOPs", figures[0]),
                                                  HtmlFigure(f"Samples {HOSTILE}", figures[1])]),
    ]
    page = write_html_report(tmp / "report", "Report: demo", sections, subtitle="run demo <1>")
    return page, figures


class PageParser(HTMLParser):
    """Collects what the markup checks need: link targets, images, tables and their body rows."""

    def __init__(self):
        super().__init__()
        self.links, self.images, self.tables, self.ids = [], [], {}, []
        self._table, self._in_body, self._row = None, False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self._table = attrs.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = {"data-row": attrs.get("data-row"), "cells": []}
            self.tables[self._table].append(self._row)
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body, self._row = False, None

    def handle_data(self, data):
        if self._row is not None and self._row["cells"]:
            self._row["cells"][-1] += data


def test_page_is_one_self_contained_escaped_file(tmp_path):
    page, figures = build_report(tmp_path)
    assert [p.name for p in page.parent.iterdir()] == ["index.html"]
    text = page.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(text)
    assert 'src="http' not in text and 'href="http' not in text
    assert all(link.startswith(("data:", "#")) for link in parser.links), parser.links
    # every image is the original PNG, byte for byte, and is not lazy-loaded
    assert len(parser.images) == len(figures)
    for attrs, figure in zip(parser.images, figures):
        prefix, _, payload = attrs["src"].partition(",")
        assert prefix == "data:image/png;base64"
        assert base64.b64decode(payload) == figure.read_bytes()
        assert attrs.get("loading") != "lazy"
    # text is escaped everywhere: only the page's own script tag is real markup
    assert text.count("<script>") == 1 and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text
    assert "run demo &lt;1&gt;" in text
    # the leaderboard: its id, one body row per method setting, the NaN blank, numbers per column
    rows = parser.tables["leaderboard"]
    assert [row["data-row"] for row in rows] == ["0", "1", "2"]
    assert [row["cells"][1] for row in rows] == ["10.2", "9.5", "100.0"]
    assert [row["cells"][3] for row in rows] == ["2.100", "", "3.300"]
    assert [row["cells"][4] for row in rows] == ["-1.50", "-10.20", "4.10"]
    assert [row["cells"][5] for row in rows] == ["★", "★", ""]
    # the table of contents links to every section; a section's id never clashes with a table's
    assert len(set(parser.ids)) == len(parser.ids)
    assert [link for link in parser.links if link.startswith("#")] == ["#leaderboard-section", "#figures-samples"]
    assert {"leaderboard-section", "figures-samples"} <= set(parser.ids)


def test_a_figure_that_is_not_a_png_is_refused(tmp_path):
    jpeg = tmp_path / "plot.png"
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    with pytest.raises(UserError, match="not a PNG"):
        write_html_report(tmp_path / "out", "t", [HtmlSection("s", figures=[HtmlFigure("c", jpeg)])])
    assert not (tmp_path / "out" / "index.html").exists()


@pytest.mark.parametrize("outcome", [False, webbrowser.Error("could not locate runnable browser")])
def test_open_in_browser_says_false_without_a_browser(monkeypatch, tmp_path, outcome):
    def fake_open(url, *args, **kwargs):
        assert url.startswith("file://")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(webbrowser, "open", fake_open)
    assert open_in_browser(tmp_path / "index.html") is False


def test_open_in_browser_says_true_when_a_browser_opened_it(monkeypatch, tmp_path):
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    assert open_in_browser(tmp_path / "index.html") is True
    assert opened == [(tmp_path / "index.html").resolve().as_uri()]


# ---- in a real headless browser ----

def _browser_missing() -> str | None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                "`.ci/run` installs them with apt-get when it runs as root")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver's path is explicit, so selenium-manager is never asked to find or download one
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    page, _ = build_report(tmp_path_factory.mktemp("html-report"))
    return page


@pytest.fixture
def loaded(browser, report_page):
    browser.get(report_page.resolve().as_uri())  # returns after the load event: images included
    return browser


def column_values(driver, header: str) -> list[str]:
    return driver.execute_script("""
        const table = document.getElementById("leaderboard");
        const column = [...table.tHead.rows[0].cells].findIndex(th => th.textContent.trim() === arguments[0]);
        return [...table.tBodies[0].rows].map(row => row.cells[column].textContent);
    """, header)


def click_header(driver, header: str) -> str:
    from selenium.webdriver.common.by import By

    cell = next(th for th in driver.find_elements(By.CSS_SELECTOR, "#leaderboard thead th")
                if th.get_attribute("textContent").strip() == header)
    cell.click()
    return cell.get_attribute("aria-sort")


def test_page_loads_without_console_errors_or_warnings(loaded):
    messages = loaded.get_log("browser")
    assert [m for m in messages if m["level"] in ("SEVERE", "WARNING")] == []
    loaded.execute_script("console.error('probe')")  # the log is really being read
    assert any("probe" in m["message"] and m["level"] == "SEVERE" for m in loaded.get_log("browser"))


def test_every_image_is_decoded(loaded):
    states = loaded.execute_script(
        "return [...document.images].map(img => [img.complete, img.naturalWidth, img.naturalHeight]);")
    assert states == [[True, 320, 200], [True, 96, 96]]


def test_leaderboard_has_a_row_per_method_setting(loaded):
    rows = loaded.execute_script("return document.querySelectorAll('#leaderboard tbody tr').length;")
    assert rows == len(BOARD)
    assert column_values(loaded, "method setting") == list(BOARD["method setting"])


@pytest.mark.parametrize("header", [FID, "ΔFID vs full"], ids=["FID", "delta-FID"])
def test_numeric_header_sorts_numerically_ascending_then_descending(loaded, header):
    assert click_header(loaded, header) == "ascending"
    assert [float(v) for v in column_values(loaded, header)] == sorted(BOARD[header])
    assert click_header(loaded, header) == "descending"
    assert [float(v) for v in column_values(loaded, header)] == sorted(BOARD[header], reverse=True)
    # whole rows move with the sorted cells
    methods = dict(zip(BOARD[header], BOARD["method setting"]))
    assert column_values(loaded, "method setting") == [methods[v] for v in sorted(BOARD[header], reverse=True)]
    assert loaded.get_log("browser") == []


def test_blank_cells_sort_last_both_ways(loaded):
    assert column_values(loaded, "IS ↑") == ["2.100", "", "3.300"]
    click_header(loaded, "IS ↑")
    assert column_values(loaded, "IS ↑") == ["2.100", "3.300", ""]
    click_header(loaded, "IS ↑")
    assert column_values(loaded, "IS ↑") == ["3.300", "2.100", ""]


def test_screenshot_is_a_non_blank_png(loaded, tmp_path):
    shot = tmp_path / "screenshots" / "report.png"  # under tmp_path: never written into the repository
    shot.parent.mkdir()
    assert loaded.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        grey = np.asarray(image.convert("L"))
    assert grey.min() < 128 < grey.max() and grey.std() > 5  # text and figures, not one flat colour


def wide_report(tmp: Path) -> Path:
    """A leaderboard wider than any screen: long setting names and many metric columns."""
    columns = {f"metric number {i} with a long header ↓": np.linspace(1, 2, 3) + i for i in range(14)}
    board = pd.DataFrame({"method setting": [f"a-plugin-sampler-with-a-long-name (knob={v}, dpm-solver++ 25)"
                                             for v in ("first", "second", "third")], **columns})
    sections = [HtmlSection("Leaderboard", tables=[HtmlTable("Leaderboard", board, table_id="leaderboard")])]
    return write_html_report(tmp / "report", "Report: wide", sections)


def test_a_wide_leaderboard_scrolls_inside_its_own_box_at_1280_px(browser, tmp_path):
    browser.set_window_size(1280, 900)
    try:
        browser.get(wide_report(tmp_path).resolve().as_uri())
        page, box = browser.execute_script("""
            const wrap = document.getElementById("leaderboard").closest(".table-wrap");
            const page = document.documentElement;
            return [[page.scrollWidth, page.clientWidth],
                    [wrap.scrollWidth, wrap.clientWidth, getComputedStyle(wrap).overflowX,
                     wrap.getBoundingClientRect().right]];""")
    finally:
        browser.set_window_size(1200, 900)
    assert page[0] <= page[1], f"the page itself scrolls sideways: {page}"
    scroll_width, width, overflow, right = box
    assert right <= page[1], "the table's box reaches past the window"
    assert scroll_width <= width or overflow in ("auto", "scroll"), f"the table is cut off: {box}"
    assert scroll_width > width, "the check is vacuous: this table should be wider than its box"
