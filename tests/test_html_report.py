"""report.html (featsweep.analysis.html) in a real browser: Debian's Chromium, driven by Playwright.

One real sweep (tiny model, optimizer.lr × blur.k = 6 jobs) and one ``python -m
featsweep.analysis`` run serve every test. The browser tests need ``/usr/bin/chromium``
(``.ci/run`` installs it with apt-get) and the ``playwright`` package (the dev extra); without
them they skip locally and fail under CI (``CI`` set), so CI always runs them.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest

from _cli import run_module

FACTORS = ["optimizer.lr=0.01,0.1", "blur.k=1,3,5"]
CHROMIUM = os.environ.get("FEATSWEEP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The analysis directory of a real 6-job sweep (report.md, report.html, runs.parquet ...)."""
    root = tmp_path_factory.mktemp("html")
    sweep = root / "sweep"
    proc = run_module("featsweep", "-m", "model=tiny", "image.size=32", "device=cpu", "steps=4",
                      "log_every=100", *FACTORS, f"hydra.sweep.dir={sweep}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_module("featsweep.analysis", str(sweep), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report.html" in proc.stdout
    return sweep / "analysis"


@pytest.fixture(scope="module")
def table(analysed: Path) -> pd.DataFrame:
    return pd.read_parquet(analysed / "runs.parquet")


# ------------------------------------------------------------------------- without a browser


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.job_rows = 0
        self.headers: list[str] = []
        self._in_jobs = False
        self._in_button = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.refs.append(str(a[key]))
        if tag == "table":
            self._in_jobs = a.get("id") == "jobs"
        if self._in_jobs and tag == "tr" and "data-row" in a:
            self.job_rows += 1
        self._in_button = self._in_jobs and tag == "button"

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_jobs = False
        if tag == "button":
            self._in_button = False

    def handle_data(self, data: str) -> None:
        if self._in_button:
            self.headers.append(data)


def test_report_html_is_self_contained_with_every_job_and_column(analysed: Path,
                                                                  table: pd.DataFrame) -> None:
    page = (analysed / "report.html").read_text(encoding="utf-8")
    parsed = _Collector()
    parsed.feed(page)
    assert parsed.job_rows == len(table) == 6
    # every column of the analysis table (job.dir is the thumbnail's link)
    assert set(parsed.headers) == set(table.columns) - {"job.dir"}
    # every picture is embedded; links are only relative files beside the report
    images = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not [r for r in parsed.refs if re.match(r"(?i)(https?:|//|ftp:)", r)]
    assert "<link" not in page and "@import" not in page and "url(" not in page


# ------------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason is None and not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser: Any, analysed: Path) -> Iterator[Any]:
    """report.html opened from the file system with every network request refused."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    refused: list[str] = []

    def guard(route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    context.route("**/*", guard)
    errors: list[str] = []
    pg = context.new_page()
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto((analysed / "report.html").as_uri())
    pg.wait_for_load_state("load")
    yield pg
    context.close()
    assert not refused, f"report.html asked the network for {refused}"
    assert not errors, f"script errors: {errors}"


def _column(page: Any, name: str) -> list[str]:
    """data-v of column `name` in the visible job rows, top to bottom."""
    return page.evaluate("""(name) => {
        const heads = [...document.querySelectorAll('#jobs thead tr:first-child th')];
        const i = heads.findIndex(th => th.textContent.trim().replace(/ [▲▼]$/, '') === name);
        if (i < 0) throw new Error('no column ' + name);
        return [...document.querySelectorAll('#jobs tbody tr')].filter(r => !r.hidden)
            .map(r => r.cells[i].getAttribute('data-v'));
    }""", name)


def _header(page: Any, name: str) -> Any:
    return page.locator("#jobs thead tr").first.locator("button.sort", has_text=re.compile(
        "^" + re.escape(name) + "$"))


def _filter(page: Any, name: str) -> Any:
    return page.locator(f'#jobs input.filter[aria-label="filter {name}"]')


def test_every_row_and_thumbnail_renders(page: Any, table: pd.DataFrame) -> None:
    rows = page.locator("#jobs tbody tr")
    assert rows.count() == len(table)
    thumbs = page.locator("#jobs tbody img.thumb")
    assert thumbs.count() == len(table)
    sizes = page.evaluate("""() => [...document.querySelectorAll('#jobs tbody img.thumb')]
        .map(i => [i.complete, i.naturalWidth, i.naturalHeight,
                   i.getBoundingClientRect().height])""")
    assert all(done and w == 32 and h == 32 and shown > 0 for done, w, h, shown in sizes), sizes
    assert [int(v) for v in _column(page, "job.num")] == table["job.num"].tolist()
    assert page.text_content("#jobs-count") == f"{len(table)} of {len(table)} shown"


def test_sorting_by_activation_orders_the_rows(page: Any, table: pd.DataFrame) -> None:
    _header(page, "activation").click()
    up = [float(v) for v in _column(page, "activation")]
    assert up == sorted(table["activation"].tolist())
    expected = table.sort_values("activation", kind="stable")["job.num"].tolist()
    assert [int(v) for v in _column(page, "job.num")] == expected
    _header(page, "activation").click()  # again: descending
    assert [float(v) for v in _column(page, "activation")] == sorted(up, reverse=True)
    assert page.locator('#jobs th[aria-sort="descending"]').count() == 1


def test_a_filter_hides_rows(page: Any, table: pd.DataFrame) -> None:
    _filter(page, "blur.k").fill(">=3")
    wide = table[table["blur.k"] >= 3]["job.num"].tolist()
    assert [int(v) for v in _column(page, "job.num")] == wide and len(wide) == 4
    assert page.locator("#jobs tbody tr:not([hidden])").count() == 4
    assert page.text_content("#jobs-count") == f"4 of {len(table)} shown"
    _filter(page, "optimizer.lr").fill("=0.1")  # filters combine
    both = table[(table["blur.k"] >= 3) & (table["optimizer.lr"] == 0.1)]["job.num"].tolist()
    assert [int(v) for v in _column(page, "job.num")] == both and len(both) == 2
    _filter(page, "blur.k").fill("")
    _filter(page, "optimizer.lr").fill("")
    page.locator('input.filter-all[data-table="jobs"]').fill("blur.k=5")  # any column, as text
    assert [int(v) for v in _column(page, "job.num")] == \
        table[table["blur.k"] == 5]["job.num"].tolist()
    page.locator('input.filter-all[data-table="jobs"]').fill("")
    assert page.locator("#jobs tbody tr:not([hidden])").count() == len(table)


def test_claims_table_plots_and_factor_grids_render(page: Any, analysed: Path) -> None:
    claims = pd.read_csv(analysed / "claims.csv")
    assert page.locator("#claims tbody tr").count() == len(claims)
    tested = len(list(analysed.glob("claim_*.png"))) + len(list(analysed.glob("sheet_*.png")))
    plots = page.evaluate("""() => [...document.querySelectorAll('section.claim img.plot')]
        .map(i => i.complete && i.naturalWidth > 100)""")
    assert len(plots) == tested >= 2 and all(plots)
    grids = page.locator("table.grid")
    assert grids.count() == 2  # one per swept factor
    for i in range(2):
        cells = grids.nth(i).locator("img.thumb")
        assert cells.count() == 6
        assert all(page.evaluate("(g) => [...document.querySelectorAll('table.grid')[g]"
                                 ".querySelectorAll('img')].map(i => i.naturalWidth > 0)", i))


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def test_the_screenshot_is_not_blank(page: Any) -> None:
    shot = _png(page.screenshot(full_page=False))
    assert shot.shape[0] == 900 and shot.shape[1] == 1400
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    assert shot.std() > 20 and colours > 200, (shot.std(), colours)
    # the thumbnails were painted: the first one's pixels vary (a random-noise start)
    thumb = _png(page.locator("#jobs tbody img.thumb").first.screenshot())
    assert thumb.shape[0] >= 60 and thumb.std() > 10
    # ... and the column groups hide columns: unchecking "raw" removes the raw.* headers
    raw = page.locator("#jobs thead tr").first.locator("th.g-raw")
    assert raw.count() > 0 and raw.first.is_visible()
    page.locator('#controls input[data-group="raw"]').uncheck()
    assert not raw.first.is_visible()
