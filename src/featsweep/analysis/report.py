"""Pictures, tables and the markdown report of a sweep (what ``python -m featsweep.analysis`` writes).

Every picture is a function of the analysis table (:func:`featsweep.analysis.collect`) that
returns a :class:`matplotlib.figure.Figure` built without pyplot, so these helpers neither need
nor change a backend: a notebook shows the figure with ``display(fig)``, :func:`save_figure`
writes it (atomically) as PNG.

- :func:`swept_factors` — the Hydra overrides that vary between jobs and their values.
- :func:`contact_sheet` — the images in a grid laid out by those factors.
- :func:`activation_curves` — trace.csv of every job.
- :func:`claims_table` — :func:`featsweep.analysis.claims.evaluate` for a sweep: claims whose
  factor does not vary here are reported as ``not in this sweep`` instead of failing.
- :func:`claim_figure` — metric against factor for one claim, one line per paired group.
- :func:`metric_correlations` — Spearman correlations between metrics.
- :func:`write_report` — all of the above into ``SWEEP_DIR/analysis/``.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from featsweep.analysis.claims import (
    MIN_GROUPS,
    RESULT_COLUMNS,
    Claim,
    ClaimsError,
    _canon,
    _show,
    evaluate,
    group_table,
    load_claims,
    notes_claims_path,
    paired_frame,
    validate_claims,
)
from featsweep.analysis.collect import TRACE_COLUMNS, collect, read_trace
from featsweep.analysis.columns import config_columns
from featsweep.metrics import METRICS

NULL = _canon(None)  # how a missing value reads after _canon

__all__ = [
    "CLAIMS_COLUMNS",
    "NOT_IN_SWEEP",
    "activation_curves",
    "claim_figure",
    "claims_table",
    "contact_sheet",
    "markdown_table",
    "metric_correlations",
    "save_figure",
    "swept_factors",
    "traces",
    "verdict_table",
    "write_report",
]

NOT_IN_SWEEP = "not in this sweep"
CLAIMS_COLUMNS: tuple[str, ...] = (*RESULT_COLUMNS, "note")
MAX_SHEET_COLS = 8  # the contact sheet puts trailing factors on columns up to this many columns
MAX_SHEET_IMAGES = 256  # larger sweeps: the first this many jobs (the caption says so)
MAX_TABLE_ROWS = 60  # per-job and per-group tables in report.md (full tables in the CSVs)
DPI = 100


# --------------------------------------------------------------------------------------------
# Small helpers


def _fmt(value: Any) -> str:
    """A cell for markdown: numbers to 4 significant digits, missing as '–'."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{float(value):.4g}"
    return str(value)


def markdown_table(frame: pd.DataFrame, *, max_rows: int | None = None) -> str:
    """``frame`` as a GitHub markdown table (no index); longer frames are cut with a note."""
    shown = frame if max_rows is None or len(frame) <= max_rows else frame.head(max_rows)

    def cell(value: Any) -> str:
        return _fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in frame.columns) + " |",
        "| " + " | ".join("---" for _ in frame.columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    if len(shown) < len(frame):
        lines.append(f"\n({len(frame) - len(shown)} more rows not shown.)")
    return "\n".join(lines)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    data = buffer.getvalue()
    _atomic(Path(path), lambda f: f.write(data))
    return Path(path)


def _atomic(path: Path, write: Any) -> None:
    """featsweep.artifacts.atomic_write, then the usual rw-r--r-- (its temp files are private)."""
    from featsweep.artifacts import atomic_write

    atomic_write(path, write)
    try:
        path.chmod(0o644)
    except OSError:
        pass


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------------------------
# Swept factors (from the jobs' Hydra overrides)

_SPLIT = re.compile(r"\s+(?=[+~]*[\w./@-]+=|~)")


def _parse_overrides(text: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    if not isinstance(text, str) or not text.strip():
        return out
    for item in _SPLIT.split(text.strip()):
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def swept_factors(df: pd.DataFrame) -> dict[str, list[str]]:
    """Override keys whose value differs between jobs → their values (override text, sorted).

    Read from ``job.overrides``, in the order the keys were given (Hydra's sweeper varies the last
    one fastest). Numbers sort numerically, other values in order of first appearance. A key
    missing from some jobs counts, with the value ``""``.
    """
    parsed = [_parse_overrides(t) for t in df.get("job.overrides", pd.Series(dtype=object))]
    keys: dict[str, None] = {}
    for p in parsed:
        for k in p:
            keys.setdefault(k, None)
    out: dict[str, list[str]] = {}
    for key in keys:
        values = [p.get(key, "") for p in parsed]
        distinct = list(dict.fromkeys(values))
        if len(distinct) < 2:
            continue
        canon = [_canon(v) for v in distinct]
        if all(c[0] == "num" for c in canon):
            distinct = [v for _, v in sorted(zip(canon, distinct), key=lambda cv: cv[0][1])]
        out[key] = distinct
    return out


def _factor_label(overrides: dict[str, str], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={overrides.get(k, '')}" for k in keys)


# --------------------------------------------------------------------------------------------
# Contact sheet


def _load_image(job_dir: Any) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(Path(str(job_dir)) / "image.png") as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        return None


def contact_sheet(df: pd.DataFrame, *, max_images: int = MAX_SHEET_IMAGES, cell_in: float = 1.5) -> Figure:
    """The jobs' display images (``image.png``) in a grid laid out by the swept factors.

    Trailing swept override keys go on columns (while at most :data:`MAX_SHEET_COLS` columns), the
    others on rows; rows and columns are labelled ``key=value``. Each image is titled with its job
    number and final activation (or its status when not ``ok``). When the factors do not place
    every job in its own cell (e.g. a directory of several sweeps), the images are shown in job
    order, each titled with its varying overrides.
    """
    jobs = df.head(max_images)
    factors = swept_factors(df)
    overrides = [_parse_overrides(t) for t in jobs["job.overrides"]]
    keys = list(factors)
    col_keys: list[str] = []
    n_cols = 1
    for key in reversed(keys):
        # At least one key on columns; at least one left for rows when there are several.
        if col_keys and (n_cols * len(factors[key]) > MAX_SHEET_COLS or key == keys[0]):
            break
        col_keys.insert(0, key)
        n_cols *= len(factors[key])
    row_keys = [k for k in keys if k not in col_keys]

    def combos(ks: list[str]) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = [()]
        for k in ks:
            out = [c + (v,) for c in out for v in factors[k]]
        return out

    rows, cols = combos(row_keys), combos(col_keys)
    cells: dict[tuple[int, int], int] = {}
    gridded = bool(keys) and len(rows) * len(cols) <= max(4 * len(jobs), 16)
    if gridded:
        row_of = {c: i for i, c in enumerate(rows)}
        col_of = {c: i for i, c in enumerate(cols)}
        for index, o in enumerate(overrides):
            where = (row_of[tuple(o.get(k, "") for k in row_keys)],
                     col_of[tuple(o.get(k, "") for k in col_keys)])
            if where in cells:
                gridded = False
                break
            cells[where] = index
    if not gridded:
        n_cols = max(1, min(MAX_SHEET_COLS, math.ceil(math.sqrt(len(jobs)))))
        cells = {(i // n_cols, i % n_cols): i for i in range(len(jobs))}
        n_rows = max(1, math.ceil(len(jobs) / n_cols))
    else:
        n_rows, n_cols = len(rows), len(cols)

    # Layout in inches: row labels on the left, column headers and the title on top.
    label_w = 0.0
    if gridded and row_keys:
        longest = max(len(f"{k}={v}") for k in row_keys for v in factors[k])
        label_w = 0.25 + 0.052 * longest
    top_in = 0.35 + 0.22 + (0.12 * len(col_keys) if gridded else 0.0)
    cell_h = cell_in + (0.45 if not gridded and keys else 0.3)
    width, height = label_w + cell_in * n_cols + 0.1, top_in + cell_h * n_rows + 0.05
    fig = Figure(figsize=(width, height), dpi=DPI)
    grid = fig.add_gridspec(n_rows, n_cols, left=label_w / width, right=1 - 0.1 / width,
                            top=1 - top_in / height, bottom=0.05 / height,
                            wspace=0.08, hspace=(cell_h - cell_in) / cell_in)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if gridded and r == 0 and col_keys:
                ax.annotate("\n".join(f"{k}={v}" for k, v in zip(col_keys, cols[c])), (0.5, 1.0),
                            xycoords="axes fraction", xytext=(0, 12), textcoords="offset points",
                            ha="center", va="bottom", fontsize=6.5)
            if gridded and c == 0 and row_keys:
                ax.annotate("\n".join(f"{k}={v}" for k, v in zip(row_keys, rows[r])), (0.0, 0.5),
                            xycoords="axes fraction", xytext=(-6, 0), textcoords="offset points",
                            ha="right", va="center", fontsize=6.5)
            index = cells.get((r, c))
            if index is None:
                ax.set_facecolor("white")
                continue
            job = jobs.iloc[index]
            status = str(job["status"])
            act = job["activation"]
            title = f"#{job['job.num']} act {_fmt(act)}" if status == "ok" else f"#{job['job.num']} {status}"
            if not gridded and keys:
                title += "\n" + textwrap.shorten(_factor_label(overrides[index], keys), 40)
            ax.set_title(title, fontsize=7, pad=2)
            image = _load_image(job["job.dir"])
            if image is None:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
            else:
                ax.imshow(image, interpolation="nearest")
                for spine in ax.spines.values():  # a frame: white image areas stay visible
                    spine.set_visible(True)
                    spine.set_color("0.75")
    shown = "" if len(jobs) == len(df) else f" (first {len(jobs)} of {len(df)} jobs)"
    fig.suptitle(f"image.png of each job{shown}", fontsize=9, y=1 - 0.08 / height, va="top")
    return fig


# --------------------------------------------------------------------------------------------
# Activation curves


def traces(df: pd.DataFrame) -> pd.DataFrame:
    """All jobs' trace.csv in one long frame: ``job.num``, ``step``, ``activation``.

    Jobs whose trace is missing or unreadable contribute no rows.
    """
    parts = []
    for num, job_dir in zip(df["job.num"], df["job.dir"]):
        try:
            trace = read_trace(job_dir)
        except ValueError:
            continue
        if not trace.empty:
            parts.append(trace.assign(**{"job.num": num})[["job.num", "step", "activation"]])
    if not parts:
        return pd.DataFrame({"job.num": pd.Series(dtype=int), "step": pd.Series(dtype=float),
                             "activation": pd.Series(dtype=float)})
    return pd.concat(parts, ignore_index=True)


def activation_curves(df: pd.DataFrame, *, max_legend: int = 12) -> Figure:
    """Activation against step for every job (``trace.csv``): did the runs converge?

    Up to ``max_legend`` jobs get a colour and a legend entry each (labelled by the swept
    factors); with more jobs the colour shows the first swept factor's value.
    """
    long = traces(df)
    factors = swept_factors(df)
    keys = list(factors)
    labels = {num: _factor_label(_parse_overrides(o), keys) or f"job {num}"
              for num, o in zip(df["job.num"], df["job.overrides"])}
    fig = Figure(figsize=(8.0, 4.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    nums = list(dict.fromkeys(long["job.num"]))
    colour_key = None
    if len(nums) > max_legend and keys:
        colour_key = keys[0]
        values = factors[colour_key]
        cmap = _cmap(len(values))
        value_of = {num: _parse_overrides(o).get(colour_key, "")
                    for num, o in zip(df["job.num"], df["job.overrides"])}
    else:
        cmap = _cmap(len(nums))
    seen: set[str] = set()
    for i, (num, trace) in enumerate(long.groupby("job.num", sort=False)):
        if colour_key is not None:
            value = value_of[num]
            colour = cmap(values.index(value) if value in values else 0)
            label = f"{colour_key}={value}" if value not in seen else None
            seen.add(value)
            ax.plot(trace["step"], trace["activation"], color=colour, lw=1.0, alpha=0.6, label=label)
        else:
            ax.plot(trace["step"], trace["activation"], color=cmap(i), lw=1.3,
                    label=f"#{num} {labels.get(num, '')}" if len(nums) <= max_legend else None)
    ax.set_xlabel("step")
    ax.set_ylabel("activation (mean of the target channel)")
    ax.set_title(f"activation during optimization ({len(nums)} of {len(df)} jobs have a trace)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def _cmap(n: int):
    from matplotlib import colormaps

    base = colormaps["tab10" if n <= 10 else "viridis"]
    if n <= 10:
        return lambda i: base(i % 10)
    return lambda i: base(i / max(1, n - 1))


# --------------------------------------------------------------------------------------------
# Claims


def _filtered(df: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    rows = df
    for column, allowed in claim.filters.items():
        wanted = {_canon(v) for v in allowed}
        rows = rows[[_canon(v) in wanted for v in rows[column]]]
    return rows


def _not_in_sweep(df: pd.DataFrame, claim: Claim) -> str | None:
    """Why ``claim`` cannot be tested on this sweep's design (None: it can)."""
    rows = _filtered(df, claim)
    if rows.empty:
        wanted = "; ".join(f"{c} in [{', '.join(_show(_canon(v)) for v in a)}]"
                           for c, a in claim.filters.items())
        return f"no job has {wanted}"
    present = sorted({c for c in (_canon(v) for v in rows[claim.factor]) if c != NULL},
                     key=lambda c: (c[0], c[1]))
    shown = ", ".join(_show(c) for c in present) or "none"
    if claim.levels is not None:
        absent = [v for v in claim.levels if _canon(v) not in present]
        if absent:
            return (f"{claim.factor} never is {' or '.join(_show(_canon(v)) for v in absent)} "
                    f"here (values: {shown})")
    elif len(present) < 2:
        return f"{claim.factor} does not vary here (values: {shown})"
    return None


def claims_table(
    df: pd.DataFrame,
    claims: Sequence[Claim],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    min_groups: int = MIN_GROUPS,
) -> pd.DataFrame:
    """Verdicts of ``claims`` on a sweep: :func:`~featsweep.analysis.claims.evaluate` plus ``note``.

    A claim whose factor does not vary in this sweep (after its filters), or never takes one of
    its levels, gets verdict :data:`NOT_IN_SWEEP` and a note saying why; the others are
    evaluated. Columns :data:`CLAIMS_COLUMNS`, one row per claim in the given order.

    Raises:
        ClaimsError: a claim names a column the table does not have (a typo: the message lists
            close names), or cannot be tested as written; raised before anything is computed.
    """
    columns = {str(c) for c in df.columns}
    typos = [c for c in claims
             if {c.factor, c.metric, *c.filters} - columns]
    if typos:
        validate_claims(typos, df)
        raise ClaimsError(f"claims name columns the table lacks: {[c.name for c in typos]}")
    notes: dict[str, str] = {}
    testable: list[Claim] = []
    for claim in claims:
        reason = _not_in_sweep(df, claim)
        if reason is None:
            testable.append(claim)
        else:
            notes[claim.name] = reason
    validate_claims(testable, df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluated = evaluate(df, testable, n_boot=n_boot, seed=seed, min_groups=min_groups)
    notes.update(evaluated.attrs.get("notes", {}))
    by_name = {row["claim"]: row for row in evaluated.to_dict("records")}
    records = []
    for claim in claims:
        if claim.name in by_name:
            record = dict(by_name[claim.name])
        else:
            levels = "" if claim.levels is None else \
                f"{_show(_canon(claim.levels[1]))} − {_show(_canon(claim.levels[0]))}"
            record = {"claim": claim.name, "factor": claim.factor, "metric": claim.metric,
                      "direction": claim.direction, "test": "", "levels": levels, "n_groups": 0,
                      "n_jobs": 0, "statistic": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                      "effect": np.nan, "verdict": NOT_IN_SWEEP}
        record["note"] = notes.get(claim.name, "")
        records.append(record)
    out = pd.DataFrame.from_records(records, columns=list(CLAIMS_COLUMNS))
    out["n_groups"] = out["n_groups"].astype(int)
    out["n_jobs"] = out["n_jobs"].astype(int)
    for column in ("statistic", "ci_low", "ci_high", "effect"):
        out[column] = out[column].astype(float)
    return out


def verdict_table(results: pd.DataFrame) -> pd.DataFrame:
    """The claims table as it reads in a report: one row per claim, numbers formatted."""
    rows = []
    for r in results.to_dict("records"):
        tested = r["verdict"] not in (NOT_IN_SWEEP, "no data")
        stat = (f"{'ρ' if r['test'] == 'spearman' else 'Δ'} = {_fmt(r['statistic'])} "
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]") if tested else "–"
        rows.append({
            "claim": r["claim"], "factor": r["factor"], "metric": r["metric"],
            "expected": r["direction"], "levels": r["levels"] or "–",
            "groups": r["n_groups"], "jobs": r["n_jobs"], "statistic [95 % CI]": stat,
            "effect": _fmt(r["effect"]) if tested else "–",
            "verdict": r["verdict"] + (f" ({r['note']})" if r.get("note") else ""),
        })
    return pd.DataFrame(rows, columns=["claim", "factor", "metric", "expected", "levels", "groups",
                                       "jobs", "statistic [95 % CI]", "effect", "verdict"])


def claim_figure(df: pd.DataFrame, claim: Claim, result: Mapping[str, Any] | None = None,
                 *, max_coloured: int = 10) -> Figure:
    """The metric against the factor for one claim: a point per job, a line per paired group
    (same seed, channel and other settings), and the mean over groups in black.

    ``result`` (a row of :func:`claims_table`) adds the verdict and statistic to the title.
    Factor values are evenly spaced in their order (weight decays 0, 1e-5, 1e-3 stay apart).
    """
    rows = paired_frame(df, claim)
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    if claim.levels is not None:
        order = [_canon(claim.levels[0]), _canon(claim.levels[1])]
    else:
        order = sorted({c for c in (_canon(v) for v in rows[claim.factor]) if c != NULL},
                       key=lambda c: (c[0], c[1]))
    position = {c: i for i, c in enumerate(order)}
    if not rows.empty:
        x = np.array([position.get(_canon(v), np.nan) for v in rows[claim.factor]], dtype=float)
        y = pd.to_numeric(rows[claim.metric], errors="coerce").to_numpy(dtype=float)
        work = pd.DataFrame({"group": rows["group"].to_numpy(), "x": x, "y": y}).dropna()
        groups = list(dict.fromkeys(work["group"]))
        cmap = _cmap(len(groups))
        width = 0.12 if len(groups) > 1 else 0.0
        for i, (name, part) in enumerate(work.groupby("group", sort=False)):
            per_level = part.groupby("x")["y"].mean()
            jitter = (i / max(1, len(groups) - 1) - 0.5) * width if len(groups) > 1 else 0.0
            coloured = len(groups) <= max_coloured
            colour = cmap(i) if coloured else "0.55"
            ax.plot(per_level.index + jitter, per_level.to_numpy(), "-", color=colour,
                    alpha=0.8 if coloured else 0.35, lw=1.0,
                    label=textwrap.shorten(str(name), 60) if coloured else None)
            ax.plot(part["x"] + jitter, part["y"], "o", color=colour, ms=4,
                    alpha=0.9 if coloured else 0.5)
        means = work.groupby(["group", "x"])["y"].mean().groupby("x").mean()
        ax.plot(means.index, means.to_numpy(), "-s", color="black", lw=2.4, ms=6,
                label=f"mean of {len(groups)} group(s)", zorder=5)
        ax.legend(fontsize=6.5, loc="best", frameon=False)
    else:
        ax.text(0.5, 0.5, "no finished job pairs up for this claim", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([_show(c) for c in order])
    ax.set_xlim(-0.5, max(len(order), 1) - 0.5)
    ax.set_xlabel(claim.factor + ("  (A → B)" if claim.levels is not None else ""))
    ax.set_ylabel(claim.metric)
    ax.grid(alpha=0.3)
    title = textwrap.fill(claim.name, 70)
    if result is not None:
        title += (f"\n{result['verdict']}: "
                  f"{'ρ' if result.get('test') == 'spearman' else 'Δ'} = {_fmt(result['statistic'])} "
                  f"[{_fmt(result['ci_low'])}, {_fmt(result['ci_high'])}], "
                  f"{result['n_groups']} group(s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Metric correlations


def metric_correlations(df: pd.DataFrame, *, prefixes: Sequence[str] = ("display.", "raw."),
                        extra: Sequence[str] = ("activation",)) -> Figure:
    """Heatmap of Spearman correlations between the image metrics (and activation), over the
    jobs with status ``ok``; columns that are constant or all missing are left out."""
    ok = df[df["status"].astype(str) == "ok"] if "status" in df else df
    names = [c for c in extra if c in ok] + [f"{p}{m}" for p in prefixes for m in METRICS
                                              if f"{p}{m}" in ok]
    data = ok[names].apply(pd.to_numeric, errors="coerce")
    data = data.loc[:, [c for c in data if data[c].notna().sum() >= 2 and data[c].nunique() > 1]]
    corr = data.corr(method="spearman") if data.shape[1] else pd.DataFrame()
    n = corr.shape[0]
    side = max(4.0, 0.42 * n + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    if n == 0:
        ax.text(0.5, 0.5, "no metric varies over the finished jobs", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    image = ax.imshow(corr.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(corr.columns, rotation=90, fontsize=7)
    ax.set_yticklabels(corr.index, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = corr.iat[i, j]
                if np.isfinite(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Spearman ρ")
    ax.set_title(f"metric correlations over {len(ok)} finished job(s)", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# The report


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].rstrip("_") or "claim"


def _parquet_ready(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (e.g. numbers and text) as text, so Arrow can store them."""
    out = df.copy()
    for column in out.columns:
        if out[column].dtype != object:
            continue
        kinds = {type(v) for v in out[column] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1:
            out[column] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                           for v in out[column]]
    out.attrs = {}
    return out


def _settings_section(df: pd.DataFrame) -> list[str]:
    factors = swept_factors(df)
    lines = ["## Settings", ""]
    if factors:
        lines += ["Swept (Hydra overrides that differ between jobs):", "",
                  markdown_table(pd.DataFrame({
                      "override": list(factors),
                      "values": [", ".join(v if v != "" else "(unset)" for v in vals)
                                 for vals in factors.values()]})), ""]
    else:
        lines += ["No override differs between the jobs.", ""]
    common = [k for k in _parse_overrides(df["job.overrides"].iloc[0]) if k not in factors]
    if common:
        first = _parse_overrides(df["job.overrides"].iloc[0])
        lines += ["Given to every job: `" + " ".join(f"{k}={first[k]}" for k in common) + "`", ""]
    fixed, varying = [], []
    for column in config_columns(df):
        values = {_canon(v) for v in df[column]}
        (fixed if len(values) <= 1 else varying).append(column)
    if fixed:
        lines += ["Held fixed in every job:", "", markdown_table(pd.DataFrame({
            "setting": fixed, "value": [_fmt(df[c].iloc[0]) for c in fixed]})), ""]
    hidden = [c for c in varying if c not in factors]
    if hidden:
        lines += [f"Config leaves that vary: {', '.join(f'`{c}`' for c in varying)}.", ""]
    devices = sorted({str(d) for d in df.get("result.device", pd.Series(dtype=object)).dropna()})
    seconds = pd.to_numeric(df.get("result.seconds", pd.Series(dtype=float)), errors="coerce")
    if devices:
        lines += [f"Device(s): {', '.join(devices)}. Reported seconds per job: median "
                  f"{_fmt(seconds.median())}, max {_fmt(seconds.max())} (a batch's jobs share "
                  f"one time).", ""]
    return lines


def _status_section(df: pd.DataFrame) -> list[str]:
    counts = df["status"].astype(str).value_counts()
    lines = ["## Status", "", markdown_table(pd.DataFrame({"status": counts.index,
                                                           "jobs": counts.to_numpy()})), ""]
    bad = df[df["status"].astype(str) != "ok"]
    if len(bad):
        keys = list(swept_factors(df))
        lines += ["Jobs that did not finish ok (still running ones are analysed as they stand):",
                  "", markdown_table(pd.DataFrame({
                      "job": bad["job.num"].to_numpy(),
                      "overrides": [_factor_label(_parse_overrides(o), keys) or o
                                    for o in bad["job.overrides"]],
                      "status": bad["status"].to_numpy(),
                      "error": [textwrap.shorten(str(e), 160) if isinstance(e, str) else "–"
                                for e in bad.get("result.error", [None] * len(bad))],
                  }), max_rows=MAX_TABLE_ROWS), ""]
    return lines


def _runs_table(df: pd.DataFrame) -> pd.DataFrame:
    keys = list(swept_factors(df))
    table = pd.DataFrame({
        "job": df["job.num"].to_numpy(),
        "overrides": [_factor_label(_parse_overrides(o), keys) or "–" for o in df["job.overrides"]],
        "status": df["status"].to_numpy(),
    })
    for column, label in zip(TRACE_COLUMNS, ("act@0", "act@10%", "act@50%", "act@100%")):
        table[label] = df[column].to_numpy()
    for metric in ("brightness", "contrast", "hf_energy", "sharpness"):
        table[f"display.{metric}"] = df[f"display.{metric}"].to_numpy()
    return table


def write_report(
    sweep_dir: str | Path,
    *,
    claims_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    n_boot: int = 2000,
) -> Path:
    """Analyse a sweep and write ``out_dir`` (default ``SWEEP_DIR/analysis/``); returns report.md.

    Files: runs.parquet, runs.csv (the :func:`collect` table), claims.csv (:func:`claims_table`),
    contact_sheet.png, activation.png, claim_NN_<slug>.png (one per tested claim) and report.md
    (settings, status, pictures next to their tables, verdicts). Every file is written atomically.
    Works on a sweep still running: jobs without result.json are listed as running.

    Raises:
        CollectError: no such directory, or no job in it.
        ClaimsError: the claims file is malformed or names columns the table lacks (checked
            before any output is written).
    """
    sweep = Path(sweep_dir)
    claims = load_claims(notes_claims_path() if claims_file is None else claims_file)
    df = collect(sweep)
    results = claims_table(df, claims, n_boot=n_boot)
    out = sweep / "analysis" if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def parquet(f: Any) -> None:
        _parquet_ready(df).to_parquet(f, index=False)

    _atomic(out / "runs.parquet", parquet)
    _write_text(out / "runs.csv", df.to_csv(index=False))
    _write_text(out / "claims.csv", results.to_csv(index=False))

    sheet = contact_sheet(df)
    save_figure(sheet, out / "contact_sheet.png")
    save_figure(activation_curves(df), out / "activation.png")

    claim_pngs: dict[str, str] = {}
    wanted: set[str] = set()
    for number, (claim, row) in enumerate(zip(claims, results.to_dict("records")), start=1):
        if row["verdict"] == NOT_IN_SWEEP:
            continue
        name = f"claim_{number:02d}_{_slug(claim.name)}.png"
        save_figure(claim_figure(df, claim, row), out / name)
        claim_pngs[claim.name] = name
        wanted.add(name)
    for stale in out.glob("claim_*.png"):
        if stale.name not in wanted:
            stale.unlink(missing_ok=True)

    factors = swept_factors(df)
    counts = df["status"].astype(str).value_counts()
    status_text = ", ".join(f"{n} {s}" for s, n in counts.items())
    source = "featsweep's notes claims (featsweep/claims/notes.yaml)" if claims_file is None \
        else f"`{claims_file}`"
    lines = [
        f"# Sweep analysis: `{sweep.resolve().name}`", "",
        f"Sweep directory `{sweep.resolve()}`: {len(df)} job(s), {status_text}. "
        f"Tables: [runs.csv](runs.csv) ([runs.parquet](runs.parquet)), one row per job; "
        f"[claims.csv](claims.csv), one row per claim.", "",
    ]
    lines += _settings_section(df)
    lines += _status_section(df)
    row_keys = list(factors)
    lines += ["## Images", "",
              "![Contact sheet: each job's image.png](contact_sheet.png)", "",
              "Each image is the display image (min-max stretched, as the notes showed it), titled "
              "with its job number and final activation"
              + (f"; rows and columns are the swept overrides ({', '.join(row_keys)})." if row_keys
                 else "."), "",
              "## Activation", "",
              "![Activation against step for every job](activation.png)", "",
              "Activation at 0, 10, 50 and 100 % of the recorded steps, and a few display metrics "
              "(all metrics in runs.csv):", "",
              markdown_table(_runs_table(df), max_rows=MAX_TABLE_ROWS), ""]
    tested = int((~results["verdict"].isin([NOT_IN_SWEEP])).sum())
    lines += ["## Claims", "",
              f"Claims from {source}: {len(results)} in all, {tested} testable in this sweep. "
              "Jobs are paired within groups that hold every other setting equal; the statistic is "
              "the mean over groups of Spearman ρ (ordered factor) or of B − A (two levels), with a "
              "95 % bootstrap CI over groups; *supported* / *contradicted* when the CI excludes 0 "
              f"(at least {MIN_GROUPS} groups).", "",
              markdown_table(verdict_table(results)), ""]
    for claim, row in zip(claims, results.to_dict("records")):
        if claim.name not in claim_pngs:
            continue
        lines += [f"### {claim.name}", "",
                  f"![{claim.metric} against {claim.factor}]({claim_pngs[claim.name]})", ""]
        groups = group_table(df, claim)
        if len(groups):
            lines += [markdown_table(groups, max_rows=20), ""]
        if row.get("note"):
            lines += [f"Note: {row['note']}", ""]
    report = out / "report.md"
    _write_text(report, "\n".join(lines).rstrip() + "\n")
    return report
