"""Pictures of a sweep, each a function of the analysis table (:func:`featsweep.analysis.collect`).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so these
helpers neither need nor change a backend: a notebook shows the figure with ``display(fig)``,
:func:`save_figure` writes it (atomically) as PNG.

- :func:`contact_sheet` — the images in a grid laid out by the swept factors; a single long row
  wraps into a grid.
- :func:`claim_sheet` — one claim's images: factor levels as columns, paired groups as rows.
- :func:`activation_curves` — trace.csv of every job, coloured (and dashed) by factor values.
- :func:`claim_figure` — metric against factor for one claim, one line per paired group.
- :func:`metric_correlations` — Spearman correlations between metrics.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from featsweep.analysis.claims import Claim, canon, paired_frame, show
from featsweep.analysis.factors import factor_label, fmt, parse_overrides, swept_factors
from featsweep.analysis.jobs import read_trace
from featsweep.analysis.values import NULL
from featsweep.metrics import METRICS

__all__ = [
    "activation_curves", "atomic_bytes", "claim_figure", "claim_sheet", "contact_sheet",
    "metric_correlations", "save_figure", "traces",
]

MAX_SHEET_COLS = 8  # columns of a contact sheet before a row wraps
MAX_SHEET_IMAGES = 256  # larger sweeps: the first this many jobs (the caption says so)
MAX_SHEET_ROWS = 24  # paired groups shown in a claim's sheet (the caption says how many more)
DPI = 100


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    data = buffer.getvalue()
    atomic_bytes(Path(path), lambda f: f.write(data))
    return Path(path)


def atomic_bytes(path: Path, write: Any) -> None:
    """featsweep.artifacts.atomic_write, then the usual rw-r--r-- (its temp files are private)."""
    from featsweep.artifacts import atomic_write

    atomic_write(path, write)
    try:
        path.chmod(0o644)
    except OSError:
        pass


def _load_image(job_dir: Any) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(Path(str(job_dir)) / "image.png") as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        return None


def _job_title(job: Mapping[str, Any]) -> str:
    status = str(job["status"])
    if status == "ok":
        return f"#{job['job.num']} act {fmt(job['activation'])}"
    return f"#{job['job.num']} {status.replace('_', ' ')}"


def _image_grid(jobs: pd.DataFrame, cells: Mapping[tuple[int, int], int], n_rows: int, n_cols: int,
                *, titles: Mapping[int, str], row_labels: Sequence[str] | None = None,
                col_labels: Sequence[str] | None = None, suptitle: str, cell_in: float = 1.5) -> Figure:
    """Images of ``jobs`` (row positions) at grid cells (row, column), labelled; empty cells blank."""
    label_w = 0.0
    if row_labels:
        longest = max(max(len(line) for line in text.split("\n")) for text in row_labels)
        label_w = 0.25 + 0.052 * longest
    header_lines = max((text.count("\n") + 1 for text in col_labels), default=0) if col_labels else 0
    top_in = 0.35 + 0.22 + 0.12 * header_lines
    title_lines = max((t.count("\n") + 1 for t in titles.values()), default=1)
    cell_h = cell_in + 0.15 + 0.15 * title_lines
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
            if r == 0 and col_labels:
                ax.annotate(col_labels[c], (0.5, 1.0), xycoords="axes fraction", xytext=(0, 12),
                            textcoords="offset points", ha="center", va="bottom", fontsize=6.5)
            if c == 0 and row_labels:
                ax.annotate(row_labels[r], (0.0, 0.5), xycoords="axes fraction", xytext=(-6, 0),
                            textcoords="offset points", ha="right", va="center", fontsize=6.5)
            index = cells.get((r, c))
            if index is None:
                ax.set_facecolor("white")
                continue
            job = jobs.iloc[index]
            ax.set_title(titles.get(index, ""), fontsize=7, pad=2)
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
    fig.suptitle(suptitle, fontsize=9, y=1 - 0.08 / height, va="top")
    return fig


def contact_sheet(df: pd.DataFrame, *, max_images: int = MAX_SHEET_IMAGES, cell_in: float = 1.5) -> Figure:
    """The jobs' display images (``image.png``) in a grid laid out by the swept factors.

    Trailing swept override keys go on columns (while at most :data:`MAX_SHEET_COLS` columns), the
    others on rows; rows and columns are labelled ``key=value``. Each image is titled with its job
    number and final activation (or its status when not ``ok``). When that grid would be one long
    row (one factor with many values, e.g. ``target.channel=range(0,16)``) or the factors do not
    place every job in its own cell (e.g. a directory of several sweeps), the images wrap into a
    near-square grid in job order, each titled with its varying overrides.
    """
    jobs = df.head(max_images)
    factors = swept_factors(df)
    overrides = [parse_overrides(t) for t in jobs["job.overrides"]]
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
    gridded = (bool(keys) and len(rows) * len(cols) <= max(4 * len(jobs), 16)
               and len(cols) <= MAX_SHEET_COLS)
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
    shown = "" if len(jobs) == len(df) else f" (first {len(jobs)} of {len(df)} jobs)"
    suptitle = f"image.png of each job{shown}"
    if gridded:
        titles = {i: _job_title(jobs.iloc[i]) for i in range(len(jobs))}
        return _image_grid(
            jobs, cells, len(rows), len(cols), titles=titles,
            row_labels=["\n".join(f"{k}={v}" for k, v in zip(row_keys, r)) for r in rows] if row_keys else None,
            col_labels=["\n".join(f"{k}={v}" for k, v in zip(col_keys, c)) for c in cols],
            suptitle=suptitle, cell_in=cell_in)
    n_cols = max(1, min(MAX_SHEET_COLS, math.ceil(math.sqrt(len(jobs)))))
    cells = {(i // n_cols, i % n_cols): i for i in range(len(jobs))}
    n_rows = max(1, math.ceil(len(jobs) / n_cols))
    titles = {}
    for i in range(len(jobs)):
        title = _job_title(jobs.iloc[i])
        if keys:
            title += "\n" + textwrap.shorten(factor_label(overrides[i], keys), 40)
        titles[i] = title
    return _image_grid(jobs, cells, n_rows, n_cols, titles=titles, suptitle=suptitle, cell_in=cell_in)


def claim_sheet(df: pd.DataFrame, claim: Claim, *, max_rows: int = MAX_SHEET_ROWS,
                cell_in: float = 1.3) -> Figure:
    """One claim's images: its factor levels as columns, its paired groups as rows.

    Rows are the groups of :func:`featsweep.analysis.claims.paired_frame` (sorted by unit, then
    group), each labelled with its key; a cell holds the group's job at that level (the first, if
    several). At most ``max_rows`` groups (the title says how many there are).
    """
    rows = paired_frame(df, claim)
    if claim.levels is not None:
        order = [canon(claim.levels[0]), canon(claim.levels[1])]
    else:
        order = sorted({c for c in (canon(v) for v in rows[claim.factor]) if c != NULL},
                       key=lambda c: (c[0], c[1]))
    col_of = {c: i for i, c in enumerate(order)}
    groups = sorted(dict.fromkeys(zip(rows["unit"], rows["group"])))
    shown_groups = groups[:max_rows]
    row_of = {g: i for i, g in enumerate(shown_groups)}
    cells: dict[tuple[int, int], int] = {}
    for index, (unit, group, value) in enumerate(zip(rows["unit"], rows["group"], rows[claim.factor])):
        r = row_of.get((unit, group))
        c = col_of.get(canon(value))
        if r is not None and c is not None:
            cells.setdefault((r, c), index)
    more = f", first {len(shown_groups)} of {len(groups)} groups" if len(groups) > len(shown_groups) else ""
    suptitle = textwrap.fill(claim.name, 90) + f"\n{claim.factor} (columns) × paired groups (rows){more}"
    titles = {i: _job_title(rows.iloc[i]) for i in set(cells.values())}
    row_labels = [textwrap.fill(g, 34) for _, g in shown_groups]
    if not cells:
        fig = Figure(figsize=(4.0, 1.5), dpi=DPI)
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no finished job pairs up for this claim", ha="center", va="center")
        fig.suptitle(suptitle, fontsize=8)
        return fig
    return _image_grid(rows, cells, len(shown_groups), len(order), titles=titles,
                       row_labels=row_labels, col_labels=[f"{claim.factor}={show(c)}" for c in order],
                       suptitle=suptitle, cell_in=cell_in)


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


REPLICATE_KEYS: tuple[str, ...] = ("seed", "target.channel")  # repeats of a setting, not settings
LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")


def activation_curves(df: pd.DataFrame) -> Figure:
    """Activation against step for every job (``trace.csv``): did the runs converge?

    The legend is by factor, not by job: the colour is the value of the first swept override
    that is not a replicate (:data:`REPLICATE_KEYS`: seeds and channels repeat a setting), the line
    style the value of the next one with at most four values; replicates share their setting's
    colour and style. So 130 jobs of 13 arms read as 13 colours.
    """
    long = traces(df)
    factors = swept_factors(df)
    settings = [k for k in factors if k.lstrip("+~") not in REPLICATE_KEYS] or list(factors)
    colour_key = settings[0] if settings else None
    style_key = next((k for k in settings[1:] if len(factors[k]) <= len(LINESTYLES)), None)
    parsed = {num: parse_overrides(o) for num, o in zip(df["job.num"], df["job.overrides"])}
    fig = Figure(figsize=(8.0, 4.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    nums = list(dict.fromkeys(long["job.num"]))
    colours = factors[colour_key] if colour_key else [""]
    cmap = _cmap(len(colours))
    styles = factors[style_key] if style_key else [""]
    alpha = 0.9 if len(nums) <= 12 else max(0.25, 0.9 - 0.005 * len(nums))
    for num, trace in long.groupby("job.num", sort=False):
        o = parsed.get(num, {})
        c = o.get(colour_key, "") if colour_key else ""
        st = o.get(style_key, "") if style_key else ""
        ax.plot(trace["step"], trace["activation"], lw=1.0, alpha=alpha,
                color=cmap(colours.index(c) if c in colours else 0),
                linestyle=LINESTYLES[styles.index(st) % len(LINESTYLES)] if st in styles else "-")
    from matplotlib.lines import Line2D

    handles: list[Any] = []
    if colour_key:
        handles += [Line2D([], [], color=cmap(i), lw=2, label=f"{colour_key}={v}")
                    for i, v in enumerate(colours)]
    if style_key:
        handles += [Line2D([], [], color="0.3", lw=1.2, linestyle=LINESTYLES[i % len(LINESTYLES)],
                           label=f"{style_key}={v}") for i, v in enumerate(styles)]
    ax.set_xlabel("step")
    ax.set_ylabel("activation (mean of the target channel)")
    replicates = [k for k in factors if k not in (colour_key, style_key)]
    extra = f"; each colour × style holds every {', '.join(replicates)}" if replicates else ""
    ax.set_title(textwrap.fill(f"activation during optimization ({len(nums)} of {len(df)} jobs have "
                               f"a trace{extra})", 90), fontsize=9)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False)
    fig.tight_layout()
    return fig


def _cmap(n: int):
    from matplotlib import colormaps

    base = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    if n <= 20:
        return lambda i: base(i % 20)
    return lambda i: base(i / max(1, n - 1))


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
        order = [canon(claim.levels[0]), canon(claim.levels[1])]
    else:
        order = sorted({c for c in (canon(v) for v in rows[claim.factor]) if c != NULL},
                       key=lambda c: (c[0], c[1]))
    position = {c: i for i, c in enumerate(order)}
    if not rows.empty:
        x = np.array([position.get(canon(v), np.nan) for v in rows[claim.factor]], dtype=float)
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
    ax.set_xticklabels([show(c) for c in order])
    ax.set_xlim(-0.5, max(len(order), 1) - 0.5)
    ax.set_xlabel(claim.factor + ("  (A → B)" if claim.levels is not None else ""))
    ax.set_ylabel(claim.metric)
    ax.grid(alpha=0.3)
    title = textwrap.fill(claim.name, 70)
    if result is not None:
        title += (f"\n{result['verdict']}: "
                  f"{'ρ' if result.get('test') == 'spearman' else 'Δ'} = {fmt(result['statistic'])} "
                  f"[{fmt(result['ci_low'])}, {fmt(result['ci_high'])}], "
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
