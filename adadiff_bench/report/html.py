"""One self-contained HTML page per report: tables sortable offline, figures embedded as base64 PNGs.

The page loads nothing: no CDN, no web fonts, no remote or local files (a Content-Security-Policy
says so, and the browser enforces it). Inline CSS lays it out for screen and print; a short inline
script sorts any table by a click on its header (numbers numerically, text otherwise, blanks last).
"""
from __future__ import annotations

import base64
import html
import math
import numbers
import re
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..results import atomic_write_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIGNIFICANT_DIGITS = 4  # a float column shows its largest magnitude with this many digits


@dataclass
class HtmlTable:
    caption: str
    frame: pd.DataFrame  # columns shown as given; a named index is shown as leading columns
    table_id: str | None = None
    notes: str = ""  # a paragraph under the table


@dataclass
class HtmlFigure:
    caption: str
    path: Path  # a PNG on disk, embedded in the page


@dataclass
class HtmlSection:
    title: str
    text: str = ""  # plain text; blank lines separate paragraphs, `code` spans are kept
    tables: list[HtmlTable] = field(default_factory=list)
    figures: list[HtmlFigure] = field(default_factory=list)


def write_html_report(out: Path, title: str, sections: list[HtmlSection], subtitle: str = "",
                      notices: list[str] = ()) -> Path:
    """Write `out/index.html` atomically and return its path; `notices` are shown in a box under the title."""
    path = Path(out) / "index.html"
    atomic_write_bytes(path, render_page(title, sections, subtitle, notices).encode("utf-8"))
    return path


def open_in_browser(path: Path) -> bool:
    """Open the page in the user's browser; False (nothing raised) when there is none."""
    try:
        return bool(webbrowser.open(Path(path).resolve().as_uri()))
    except (webbrowser.Error, OSError):
        return False


def render_page(title: str, sections: list[HtmlSection], subtitle: str = "", notices: list[str] = ()) -> str:
    table_ids = [table.table_id for section in sections for table in section.tables if table.table_id]
    if len(set(table_ids)) < len(table_ids):
        raise UserError(f"report table ids must be unique, got {table_ids}; give each table its own table_id")
    anchors = _anchors([section.title for section in sections], set(table_ids))
    toc = "".join(f'<li><a href="#{a}">{_esc(s.title)}</a></li>' for a, s in zip(anchors, sections))
    body = "\n".join(_section(section, anchor) for section, anchor in zip(sections, anchors))
    subtitle_html = f'<p class="subtitle">{_esc(subtitle)}</p>' if subtitle else ""
    if notices:  # what the report lacks and why: before anything a reader might take as complete
        subtitle_html += ('<div class="notice" role="note">' + "".join(
            f"<p>{_code_spans(_esc(notice))}</p>" for notice in notices) + "</div>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{_esc(title)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>
<body>
<header><h1>{_esc(title)}</h1>{subtitle_html}</header>
<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>
<main>
{body}
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""


def _section(section: HtmlSection, anchor: str) -> str:
    parts = [f'<section id="{anchor}">', f"<h2>{_esc(section.title)}</h2>", _paragraphs(section.text)]
    parts += [_table(table) for table in section.tables]
    if section.figures:
        parts.append('<div class="figures">' + "".join(_figure(f) for f in section.figures) + "</div>")
    parts.append("</section>")
    return "\n".join(part for part in parts if part)


def _paragraphs(text: str, css_class: str = "") -> str:
    """Escaped paragraphs split at blank lines; `code` spans become <code>."""
    attribute = f' class="{css_class}"' if css_class else ""
    blocks = [block.strip() for block in re.split(r"\n\s*\n", text or "") if block.strip()]
    return "".join(f"<p{attribute}>{_code_spans(_esc(block))}</p>" for block in blocks)


def _code_spans(escaped: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _table(table: HtmlTable) -> str:
    frame = table.frame
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index()
    id_attribute = f' id="{_esc(table.table_id)}"' if table.table_id else ""
    formats = [_column_format(frame.iloc[:, i]) for i in range(frame.shape[1])]
    numeric = [fmt is not None for fmt in formats]
    header = "".join(f'<th scope="col"{_num_class(n)}><button type="button">{_esc(_column_name(c))}</button></th>'
                     for c, n in zip(frame.columns, numeric))
    rows = []
    for position, values in enumerate(frame.itertuples(index=False, name=None)):
        cells = "".join(_cell(value, fmt) for value, fmt in zip(values, formats))
        rows.append(f'<tr data-row="{position}">{cells}</tr>')
    return (f'<div class="table-wrap"><table class="sortable"{id_attribute}>'
            f"<caption>{_esc(table.caption)}</caption><thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>" + _paragraphs(table.notes, "notes"))


def _column_name(column) -> str:
    return " / ".join(str(level) for level in column) if isinstance(column, tuple) else str(column)


def _num_class(numeric: bool) -> str:
    return ' class="num"' if numeric else ""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_missing(value)


def _is_missing(value) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays in a cell are shown, not tested
        return False


def _column_format(column: pd.Series) -> str | None:
    """A format for a column of numbers (None for any other column): integers as such, floats with a
    fixed number of decimals that shows the column's largest value with SIGNIFICANT_DIGITS digits."""
    values = [v for v in column if not _is_missing(v)]
    if not values or not all(_is_number(v) for v in values):
        return None
    if all(float(v).is_integer() for v in values):
        return "d"
    largest = max((abs(float(v)) for v in values if math.isfinite(float(v))), default=0.0)
    exponent = math.floor(math.log10(largest)) if largest > 0 else 0
    return f".{min(6, max(0, SIGNIFICANT_DIGITS - 1 - exponent))}f"


def _cell(value, fmt: str | None) -> str:
    """A <td>: blank for NaN/None, numbers formatted with the exact value kept in data-value for sorting."""
    if _is_missing(value):
        return "<td></td>"
    if fmt is not None:
        shown = str(int(value)) if fmt == "d" else format(float(value), fmt)
        return f'<td class="num" data-value="{_js_number(value)}">{shown}</td>'
    if isinstance(value, (bool, np.bool_)):
        value = "yes" if value else "no"
    return f"<td>{_esc(value)}</td>"


def _js_number(value) -> str:
    """The value as JavaScript's Number() reads it back exactly (repr, or Infinity)."""
    number = float(value)
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return str(int(value)) if isinstance(value, numbers.Integral) else repr(number)


def _figure(figure: HtmlFigure) -> str:
    data = Path(figure.path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise UserError(f"report figure {figure.path} is not a PNG file; save it with format='png'")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    caption = _esc(figure.caption)
    return (f'<figure><img src="{source}" alt="{caption}" width="{width}" height="{height}" '
            f'loading="eager" decoding="sync"><figcaption>{caption}</figcaption></figure>')


def _anchors(titles: list[str], taken: set[str]) -> list[str]:
    """Unique, readable ids for the sections (`fid-vs-gflops`), clear of the tables' ids in `taken`."""
    anchors, seen = [], set(taken)
    for i, title in enumerate(titles):
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or f"section-{i + 1}"
        anchor, n = base, 1
        while anchor in seen:
            anchor, n = f"{base}-section" + (f"-{n}" if n > 1 else ""), n + 1
        seen.add(anchor)
        anchors.append(anchor)
    return anchors


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


# Inline styles and script only: images from data: URIs, nothing fetched from anywhere.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
:root { color-scheme: light; --rule: #d0d4d9; --muted: #5b6470; --accent: #0b5fa5; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 72rem; padding: 1.5rem 1.25rem 3rem; color: #1d232a; background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .5rem; padding-bottom: .2rem; border-bottom: 1px solid var(--rule); }
.subtitle, .notes, caption, figcaption { color: var(--muted); }
.subtitle { margin: 0; }
.notice { margin: .8rem 0 0; padding: .4rem .8rem; border-left: 4px solid #b35c00; background: #fff6ec; max-width: 60rem; }
.notice p { margin: .3rem 0; }
.notes { font-size: .9rem; max-width: 60rem; }
code { font: .9em "DejaVu Sans Mono", Menlo, Consolas, monospace; background: #f1f3f5; padding: 0 .2em; }
a { color: var(--accent); }
.toc h2 { font-size: 1rem; border: 0; margin: 1rem 0 .25rem; }
.toc ol { margin: 0; padding-left: 1.5rem; }
.table-wrap { overflow-x: auto; margin: .75rem 0; }
table { border-collapse: collapse; font-size: .875rem; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: .25rem 0 .4rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
th { vertical-align: bottom; min-width: 4.5rem; }
.num { text-align: right; }
td.num { white-space: nowrap; }
thead th { border-bottom: 2px solid #8a939c; background: #f6f7f9; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eef4fb; }
th button { all: unset; cursor: pointer; font-weight: 600; }
th button:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
th button::after { content: "\\a0\\2195"; color: #a3abb3; font-weight: 400; }
th[aria-sort="ascending"] button::after { content: "\\a0\\25B2"; color: var(--accent); }
th[aria-sort="descending"] button::after { content: "\\a0\\25BC"; color: var(--accent); }
.figures { display: flex; flex-wrap: wrap; gap: 1rem 1.5rem; align-items: flex-start; margin: 1rem 0; }
figure { margin: 0; max-width: 100%; min-width: 12rem; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eceff2; }
/* the caption takes the image's width instead of widening the figure */
figcaption { font-size: .85rem; margin-top: .3rem; width: 0; min-width: 100%; overflow-wrap: anywhere; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  table { font-size: 7.5pt; }
  th, td { padding: .15rem .3rem; }
  th { min-width: 0; }
  .toc { display: none; }
  a { color: inherit; text-decoration: none; }
  th button::after { content: none; }
  thead { display: table-header-group; }
  tr, figure { break-inside: avoid; }
  h2 { break-after: avoid; }
  tbody tr:nth-child(even), thead th { background: none; }
  .table-wrap { overflow: visible; }
}
"""

SCRIPT = r"""
"use strict";
(function () {
  var MISSING = ["", "n/a", "nan", "-", "\u2014"];
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});

  function leadingNumber(text) {  // "12.3 ± 0.4" -> 12.3; "ddim" -> NaN
    var match = /^[-+\u2212]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?/.exec(text);
    return match ? Number(match[0].replace("\u2212", "-")) : NaN;
  }

  function sortKey(cell) {  // null for a blank cell, which sorts last either way
    if (!cell) return null;
    var text = cell.textContent.trim();
    if (MISSING.indexOf(text.toLowerCase()) >= 0) return null;
    var value = cell.getAttribute("data-value");
    return {text: text, number: value !== null ? Number(value) : leadingNumber(text)};
  }

  function sortRows(table, column, descending) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keys = rows.map(function (row) { return sortKey(row.cells[column]); });
    var numeric = keys.every(function (key) { return key === null || !isNaN(key.number); });
    var order = rows.map(function (row, i) { return i; });
    order.sort(function (a, b) {
      var ka = keys[a], kb = keys[b];
      if (ka === null || kb === null) return (ka === null) - (kb === null) || a - b;
      var c = numeric ? ka.number - kb.number : collator.compare(ka.text, kb.text);
      return (descending ? -c : c) || a - b;
    });
    order.forEach(function (i) { body.appendChild(rows[i]); });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var headers = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(headers, function (th, column) {
      th.addEventListener("click", function () {
        var descending = th.getAttribute("aria-sort") === "ascending";
        Array.prototype.forEach.call(headers, function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        sortRows(table, column, descending);
      });
    });
  });
})();
"""
