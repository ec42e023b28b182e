"""report.html: the analysis of a sweep as one self-contained page to browse in a browser.

Written by ``python -m featsweep.analysis`` beside report.md, from the same analysis run: it
reads what :func:`featsweep.analysis.report.write_report` just wrote into the output directory
(runs.parquet, claims.csv, the claim figures and sheets, activation.png) plus each job's
image.png for its thumbnail, so both reports show the same numbers.

Self-contained: every picture is embedded as a ``data:`` URI and the page's styles and script are
inline, so the file works offline, from the file system, moved anywhere (links to the full-size
job images and to report.md / runs.csv are extras that work beside the sweep). No CDN, no library:
plain HTML plus :data:`SCRIPT`, about a hundred lines of ours that sort and filter any table
with class ``sortable``. A table library that ships its assets in its Python package (itables'
offline mode bundles DataTables) would add a dependency and several hundred kB of script to every
report for two features that are a few dozen lines here, and its own look-and-feel to learn.

Sections: the job table (a thumbnail per job and every column of the analysis table, each
sortable by a click on its header and filterable by a text box under it: ``adam`` keeps rows
whose cell contains it, ``>0.5``, ``<=3``, ``=1``, ``!=ok`` compare; a column-group switch hides
groups of columns), the claims table with each tested claim's figure and image sheet, and one
image grid per swept factor (its values as columns, the other factors' combinations as rows).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featsweep.analysis.columns import config_columns
from featsweep.analysis.factors import fmt

__all__ = ["REPORT_HTML", "THUMB_PX", "column_group", "write_html_report"]

REPORT_HTML = "report.html"
THUMB_PX = 64  # thumbnail side (the image's longer side is scaled to this, never up)
MAX_GRID_COLUMNS = 24  # a factor with more values (a continuous search) gets no grid
MAX_GRID_ROWS = 60  # rows of one factor grid (the caption says when more were left out)
GROUPS: tuple[tuple[str, str], ...] = (  # column group -> what it holds (the group switch)
    ("job", "job number, directory and overrides"),
    ("config", "config leaves (.hydra/config.yaml)"),
    ("choice", "Hydra group choices"),
    ("outcome", "status and activation"),
    ("result", "other result.json fields"),
    ("trace", "activation along the run (trace.csv)"),
    ("display", "metrics of image.png"),
    ("raw", "metrics of image.npy"),
    ("other", "other columns"),
)


def column_group(name: str, config: Sequence[str] = ()) -> str:
    """The group of an analysis-table column (see :data:`GROUPS`)."""
    if name in ("status", "activation"):
        return "outcome"
    if name in config:
        return "config"
    prefix = name.split(".", 1)[0]
    known = {g for g, _ in GROUPS} - {"config", "outcome", "other"}
    return prefix if "." in name and prefix in known else "other"


# --------------------------------------------------------------------------------------------
# Pieces


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, arrays
        return False


def _cell_text(value: Any) -> str:
    """What a cell shows: the report's own cell format (``factors.fmt``), '–' when missing."""
    return "–" if _missing(value) else fmt(value)


def _sort_value(value: Any) -> str:
    """The exact value the script sorts and filters on (full precision; '' when missing)."""
    if _missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _file_uri(path: Path) -> str | None:
    try:
        return _data_uri(path.read_bytes())
    except OSError:
        return None


def _thumbnail(job_dir: Any, side: int = THUMB_PX) -> str | None:
    """image.png of a job, longer side scaled down to `side` px, as a PNG data URI (None when
    the job has no readable image). PNG, not JPEG: a lossy thumbnail would blur exactly the
    checkerboards and high frequencies the metrics measure."""
    from PIL import Image

    if not isinstance(job_dir, str) or not job_dir:
        return None
    try:
        with Image.open(Path(job_dir) / "image.png") as im:
            im = im.convert("RGB")
            scale = side / max(im.size)
            if scale < 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return None
    return _data_uri(buf.getvalue())


def _img(uri: str | None, alt: str, title: str = "", link: str | None = None) -> str:
    if uri is None:
        return f'<span class="noimg" title="{_e(title)}">no image</span>'
    tag = f'<img class="thumb" src="{uri}" alt="{_e(alt)}" title="{_e(title)}">'
    return f'<a href="{_e(link)}">{tag}</a>' if link else tag


def _rel_link(target: Path, out_dir: Path) -> str | None:
    if not target.exists():
        return None
    try:
        return Path(os.path.relpath(target, out_dir)).as_posix()
    except ValueError:  # another drive (Windows)
        return target.resolve().as_uri()


def _table(frame: pd.DataFrame, *, table_id: str, groups: Mapping[str, str] | None = None,
           lead: Mapping[str, Sequence[str]] | None = None, caption: str = "",
           constant: Sequence[str] = ()) -> str:
    """A sortable, filterable table of `frame`: a header of column names (click: sort), a row
    of filter boxes, one row per frame row. `lead` holds pre-rendered HTML for a first column
    (the thumbnail), keyed ``"header"`` (one item) and ``"cells"`` (one per row)."""
    columns = [str(c) for c in frame.columns]
    group_of = groups or {}

    def names(col: str) -> list[str]:
        return ([f"g-{group_of[col]}"] if col in group_of else []) + \
            (["g-constant"] if col in constant else [])

    def cls(col: str) -> str:
        return f' class="{" ".join(names(col))}"' if names(col) else ""

    head = [f"<th>{_e(lead['header'][0])}</th>"] if lead else []
    filters = ['<th></th>'] if lead else []
    for i, col in enumerate(columns, start=len(head)):
        head.append(f'<th{cls(col)} data-col="{i}" title="click to sort by {_e(col)}">'
                    f'<button type="button" class="sort">{_e(col)}</button></th>')
        filters.append(f'<th{cls(col)}><input class="filter" data-col="{i}" type="search" '
                       f'placeholder="filter" aria-label="filter {_e(col)}"></th>')
    body = []
    for r, values in enumerate(frame.itertuples(index=False, name=None)):
        cells = [f"<td>{lead['cells'][r]}</td>"] if lead else []
        for col, value in zip(columns, values):
            text = _cell_text(value)
            classes = names(col) + (["long"] if len(text) > 40 else [])
            attrs = f' class="{" ".join(classes)}"' if classes else ""
            if len(text) > 40:
                attrs += f' title="{_e(text)}"'
            cells.append(f'<td{attrs} data-v="{_e(_sort_value(value))}">{_e(text)}</td>')
        body.append(f'<tr data-row="{r}">' + "".join(cells) + "</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return (f'<table id="{table_id}" class="sortable">{cap}<thead><tr>{"".join(head)}</tr>'
            f'<tr class="filters">{"".join(filters)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _job_label(row: Mapping[str, Any]) -> str:
    act = row.get("activation")
    num = _cell_text(row.get("job.num"))
    return f"#{num} · {row.get('status')} · activation {_cell_text(act)}"


def _factor_grids(df: pd.DataFrame, thumbs: Sequence[str | None]) -> list[str]:
    """One grid per swept factor: its values as columns, the other factors' value combinations
    as rows, each cell the thumbnails of the jobs there (several when, e.g., only some factors
    were swept together)."""
    from featsweep.analysis.factors import parse_overrides, swept_factors

    factors = swept_factors(df)
    if not factors:
        return ["<p>No override differs between the jobs: no factor grids.</p>"]
    parsed = [parse_overrides(t) for t in df.get("job.overrides", pd.Series([""] * len(df)))]
    out = []
    for key, levels in factors.items():
        others = [k for k in factors if k != key]
        title = f'<h3 id="factor-{_e(key)}">{_e(key)}</h3>'
        if len(levels) > MAX_GRID_COLUMNS:
            out.append(title + f"<p>{len(levels)} distinct values (a continuous search): sort "
                               f"the job table by <code>{_e(key)}</code> instead.</p>")
            continue
        rows: dict[tuple[str, ...], dict[str, list[int]]] = {}
        for i, p in enumerate(parsed):
            combo = tuple(p.get(k, "") for k in others)
            rows.setdefault(combo, {}).setdefault(p.get(key, ""), []).append(i)
        combos = sorted(rows, key=lambda c: [(_num_key(v), v) for v in c])
        shown = combos[:MAX_GRID_ROWS]
        head = "".join(f"<th>{_e(key)}={_e(level)}</th>" for level in levels)
        lines = []
        for combo in shown:
            label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or "all jobs"
            cells = []
            for level in levels:
                jobs = rows[combo].get(level, [])
                cells.append("<td>" + "".join(
                    _img(thumbs[i], f"job {df['job.num'].iloc[i]}",
                         _job_label(df.iloc[i].to_dict())) for i in jobs) + "</td>")
            lines.append(f"<tr><th class='rowhead'>{_e(label)}</th>{''.join(cells)}</tr>")
        more = (f"<p>{len(combos) - len(shown)} more rows not shown.</p>"
                if len(combos) > len(shown) else "")
        out.append(f'{title}<table class="grid" data-factor="{_e(key)}"><thead><tr>'
                   f'<th>{_e(", ".join(others) or "")}</th>{head}</tr></thead><tbody>'
                   f'{"".join(lines)}</tbody></table>{more}')
    return out


def _num_key(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def _claims_section(claims: pd.DataFrame, out_dir: Path) -> list[str]:
    if claims.empty:
        return ["<p>No claims were tested.</p>"]
    parts = ['<div class="scroll">' + _table(
        claims, table_id="claims", caption="One row per claim (claims.csv); click a header to "
                                           "sort.") + "</div>"]
    for number, row in enumerate(claims.to_dict("records"), start=1):
        figures = sorted(out_dir.glob(f"claim_{number:02d}_*.png")) + \
            sorted(out_dir.glob(f"sheet_{number:02d}_*.png"))
        if not figures:
            continue
        name = row.get("claim", row.get("name", f"claim {number}"))
        pictures = "".join(
            f'<figure><img class="plot" src="{uri}" alt="{_e(p.stem)}"><figcaption>'
            f'{_e(p.name)}</figcaption></figure>'
            for p in figures if (uri := _file_uri(p)) is not None)
        parts.append(f'<section class="claim"><h3>{number}. {_e(name)}</h3>'
                     f'<p>verdict: <b>{_e(row.get("verdict", "–"))}</b></p>{pictures}</section>')
    return parts


# --------------------------------------------------------------------------------------------
# The page


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem 2rem;color:#222;background:#fff}
h1{font-size:1.5rem}h2{margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 5px;vertical-align:middle;white-space:nowrap}
thead th{background:#f3f3f3;position:sticky;top:0}
tr.filters th{top:1.9em}
.scroll{overflow:auto;max-height:80vh;border:1px solid #ccc}
button.sort{all:unset;cursor:pointer;font-weight:600}
th[aria-sort=ascending] button.sort::after{content:" ▲"}
th[aria-sort=descending] button.sort::after{content:" ▼"}
input.filter{width:6em;font-size:11px}
td.long{max-width:22em;overflow:hidden;text-overflow:ellipsis}
img.thumb{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;display:block;
  background:#888}
table.grid img.thumb{display:inline-block;margin:1px}
.noimg{display:inline-block;width:64px;height:64px;background:#eee;color:#999;font-size:10px;
  text-align:center;line-height:64px}
img.plot{max-width:46rem;border:1px solid #ddd}
figure{display:inline-block;margin:.5rem}
#controls label{margin-right:1em}
#jobs-count{font-weight:600;margin-left:1em}
"""

# Sorting and filtering for every table.sortable (no library). Each cell's data-v holds the
# exact value; numbers compare as numbers, empty cells sort last either way.
SCRIPT = r"""
(function () {
  "use strict";
  function num(s) {  // Python's repr of a float: also "inf", "-inf"
    if (s === "" || s === null) return NaN;
    if (s === "inf") return Infinity;
    if (s === "-inf") return -Infinity;
    return Number(s);
  }
  function compare(a, b) {
    if (a === "" || b === "") return (a === "") - (b === "");
    var x = num(a), y = num(b);
    if (!isNaN(x) && !isNaN(y)) return x - y;
    return a < b ? -1 : a > b ? 1 : 0;
  }
  function cellValue(row, col) {
    var c = row.cells[col];
    if (!c) return "";
    return c.hasAttribute("data-v") ? c.getAttribute("data-v") : c.textContent;
  }
  // One filter term: ">x", ">=x", "<x", "<=x", "=x", "!=x" compare; else case-insensitive text.
  function matches(value, term) {
    term = term.trim();
    if (!term) return true;
    var m = /^(>=|<=|!=|>|<|=)\s*(.*)$/.exec(term);
    if (m) {
      var op = m[1], rhs = m[2].trim(), x = num(value), y = num(rhs);
      var c = !isNaN(x) && !isNaN(y) ? x - y : compare(value.toLowerCase(), rhs.toLowerCase());
      if (value === "" && op !== "!=") return false;
      return op === ">" ? c > 0 : op === ">=" ? c >= 0 : op === "<" ? c < 0 :
             op === "<=" ? c <= 0 : op === "=" ? c === 0 : c !== 0;
    }
    return value.toLowerCase().indexOf(term.toLowerCase()) >= 0;
  }
  function setup(table) {
    var body = table.tBodies[0], inputs = table.querySelectorAll("input.filter");
    var all = document.querySelector('input.filter-all[data-table="' + table.id + '"]');
    var count = document.getElementById(table.id + "-count");
    function apply() {
      var rows = body.rows, shown = 0;
      for (var i = 0; i < rows.length; i++) {
        var ok = true;
        for (var j = 0; j < inputs.length && ok; j++)
          ok = matches(cellValue(rows[i], +inputs[j].getAttribute("data-col")), inputs[j].value);
        if (ok && all && all.value.trim()) ok = matches(rows[i].textContent, all.value);
        rows[i].hidden = !ok;
        if (ok) shown++;
      }
      if (count) count.textContent = shown + " of " + rows.length + " shown";
    }
    for (var j = 0; j < inputs.length; j++) inputs[j].addEventListener("input", apply);
    if (all) all.addEventListener("input", apply);
    var heads = table.tHead.rows[0].cells;
    for (var h = 0; h < heads.length; h++) {
      (function (th) {
        var button = th.querySelector("button.sort");
        if (!button) return;
        button.addEventListener("click", function () {
          var col = +th.getAttribute("data-col");
          var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
          for (var k = 0; k < heads.length; k++) heads[k].removeAttribute("aria-sort");
          th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
          var rows = Array.prototype.slice.call(body.rows);
          rows.sort(function (a, b) {
            var va = cellValue(a, col), vb = cellValue(b, col);
            if (va === "" || vb === "") return (va === "") - (vb === "");  // empty last
            return dir * compare(va, vb) ||
              (+a.getAttribute("data-row") - +b.getAttribute("data-row"));  // stable
          });
          for (var r = 0; r < rows.length; r++) body.appendChild(rows[r]);
        });
      })(heads[h]);
    }
    apply();
  }
  var tables = document.querySelectorAll("table.sortable");
  for (var t = 0; t < tables.length; t++) setup(tables[t]);
  // Column groups of the job table: a checkbox per group shows or hides its columns.
  var boxes = document.querySelectorAll("#controls input[data-group]");
  function groups() {
    var css = "";
    for (var b = 0; b < boxes.length; b++)
      if (!boxes[b].checked) css += ".g-" + boxes[b].getAttribute("data-group") + "{display:none}";
    document.getElementById("group-style").textContent = css;
  }
  for (var b = 0; b < boxes.length; b++) boxes[b].addEventListener("change", groups);
  groups();
})();
"""


def write_html_report(out_dir: str | Path, *, title: str | None = None) -> Path:
    """Write ``out_dir/report.html`` from the analysis files in `out_dir`; return its path.

    Args:
        out_dir: an analysis output directory written by ``write_report`` (runs.parquet, or
            runs.csv, and claims.csv; the claim PNGs and activation.png when present).
        title: page title (default: the sweep directory's name).

    Raises:
        FileNotFoundError: `out_dir` holds neither runs.parquet nor runs.csv.
    """
    from featsweep.analysis.figures import atomic_bytes

    out = Path(out_dir)
    if (out / "runs.parquet").is_file():
        df = pd.read_parquet(out / "runs.parquet")
    elif (out / "runs.csv").is_file():
        df = pd.read_csv(out / "runs.csv")
    else:
        raise FileNotFoundError(f"{out} holds no runs.parquet or runs.csv: run "
                                f"python -m featsweep.analysis first")
    claims = pd.read_csv(out / "claims.csv") if (out / "claims.csv").is_file() else pd.DataFrame()
    sweep_name = title or (out.resolve().parent.name if out.name == "analysis" else out.name)

    config = config_columns(df)
    constant = {str(c) for c in df.columns
                if df[c].map(_sort_value).nunique(dropna=False) <= 1}
    # What a reader scans first: job, outcome, the settings that vary; then every other column
    # in the analysis table's order (job.dir is the thumbnail's link).
    front = [c for c in ("job.num", "status", "activation") if c in df.columns]
    front += [c for c in config if c not in constant and c not in front]
    shown = front + [c for c in df.columns if c not in front and c != "job.dir"]
    groups = {str(c): column_group(str(c), config) for c in shown}
    thumbs = [_thumbnail(d) for d in df.get("job.dir", pd.Series([None] * len(df)))]
    links = [_rel_link(Path(d) / "image.png", out) if isinstance(d, str) and d else None
             for d in df.get("job.dir", pd.Series([None] * len(df)))]
    records = df.to_dict("records")
    lead = {"header": ["image"],
            "cells": [_img(t, f"job {r.get('job.num')}", _job_label(r), link)
                      for t, r, link in zip(thumbs, records, links)]}
    status = df["status"].astype(str).value_counts() if "status" in df else pd.Series(dtype=int)
    status_text = ", ".join(f"{n} {s}" for s, n in status.items())
    present = dict.fromkeys(groups.values())
    controls = "".join(
        f'<label title="{_e(what)}"><input type="checkbox" data-group="{g}" checked> {g}</label>'
        for g, what in GROUPS if g in present)
    if constant:
        controls += (f'<label title="columns with one value in every job ({len(constant)})">'
                     '<input type="checkbox" data-group="constant" checked> '
                     f'constant ({len(constant)})</label>')
    activation = _file_uri(out / "activation.png")
    extras = "".join(f'<a href="{name}">{name}</a> ' for name in ("report.md", "runs.csv",
                                                                 "claims.csv")
                     if (out / name).is_file())

    table = _table(df[shown], table_id="jobs", groups=groups, lead=lead,
                   constant=sorted(constant))
    body = [
        f"<h1>Sweep analysis: {_e(sweep_name)}</h1>",
        f"<p>{len(df)} job(s){': ' + _e(status_text) if status_text else ''}. "
        f"Same analysis as {extras or 'report.md'}(links work beside the sweep; this page is "
        "self-contained).</p>",
        '<nav><a href="#jobs">Jobs</a> · <a href="#claims-section">Claims</a> · '
        '<a href="#factors">Images by factor</a></nav>',
        '<h2 id="jobs">Jobs</h2>',
        "<p>Click a column name to sort (again: reverse). Type in a box under it to filter: "
        "text matches anywhere, <code>&gt;0.5</code> <code>&lt;=3</code> <code>=1</code> "
        "<code>!=ok</code> compare. Click a thumbnail for the full image.</p>",
        f'<div class="wrap"><div id="controls">columns: {controls}'
        '<input class="filter-all" data-table="jobs" type="search" '
        'placeholder="filter all columns" '
        f'aria-label="filter all columns"><span id="jobs-count"></span></div>'
        f'<div class="scroll">{table}'
        "</div></div>",
    ]
    if activation:
        body.append(f'<figure><img class="plot" src="{activation}" alt="activation against step">'
                    "<figcaption>Activation against step for every job</figcaption></figure>")
    body.append('<h2 id="claims-section">Claims</h2>')
    body += _claims_section(claims, out)
    body.append('<h2 id="factors">Images by factor</h2>')
    body.append("<p>For each swept override: its values as columns, the other overrides' "
                "combinations as rows. Hover an image for its job and activation.</p>")
    body += _factor_grids(df, thumbs)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>featsweep: {_e(sweep_name)}</title>"
            f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style>'
            '<style id="group-style"></style></head><body>'
            + "\n".join(body) + f"<script>{SCRIPT}</script></body></html>\n")
    path = out / REPORT_HTML
    atomic_bytes(path, lambda f: f.write(page.encode("utf-8")))
    return path
