"""The markdown report of a sweep and the files beside it (what ``python -m featsweep.analysis`` writes).

:func:`write_report` collects the sweep (:func:`featsweep.analysis.collect`), tests the claims
(:func:`featsweep.analysis.claims.claims_table`), draws the pictures (:mod:`.figures`) and writes
``SWEEP_DIR/analysis/``: runs.parquet, runs.csv, claims.csv, contact_sheet.png, activation.png,
claim_NN_<slug>.png and sheet_NN_<slug>.png per tested claim, and report.md. This module holds
only markdown: tables, sections and their order.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from featsweep.analysis.claims import (
    CLAIMS_COLUMNS,
    COLUMN_DEFINITIONS,
    MIN_GROUPS,
    N_BOOT,
    NOT_IN_SWEEP,
    Claim,
    canon,
    claims_table,
    expand_by,
    group_table,
    level_table,
    load_claims,
    notes_claims_path,
)
from featsweep.analysis.collect import TRACE_COLUMNS, CollectError, collect
from featsweep.analysis.columns import config_columns
from featsweep.analysis.factors import (diversity_summary, factor_label, fmt, parse_overrides,
                                       swept_factors)
from featsweep.analysis.figures import (
    activation_curves,
    atomic_bytes,
    claim_figure,
    claim_sheet,
    contact_sheet,
    metric_correlations,
    save_figure,
    traces,
)
from featsweep.analysis.jobs import CONVERGED_GAIN
from featsweep.analysis.sweeps import missing_jobs, planned_jobs

__all__ = [
    "CLAIMS_COLUMNS",
    "NOT_IN_SWEEP",
    "activation_curves",
    "claim_figure",
    "claim_sheet",
    "claims_table",
    "contact_sheet",
    "load_table",
    "markdown_table",
    "metric_correlations",
    "save_figure",
    "swept_factors",
    "sweep_status",
    "traces",
    "verdict_table",
    "write_report",
]

MAX_TABLE_ROWS = 60  # per-job and per-group tables in report.md (full tables in the CSVs)
MAX_MAIN_SHEET = 64  # jobs on the main contact sheet; larger sweeps rely on the per-claim sheets
STATUS_WORDS = {"not_started": "not started"}  # how a status reads in the report


# --------------------------------------------------------------------------------------------
# Small helpers


def markdown_table(frame: pd.DataFrame, *, max_rows: int | None = None) -> str:
    """``frame`` as a GitHub markdown table (no index); longer frames are cut with a note."""
    shown = frame if max_rows is None or len(frame) <= max_rows else frame.head(max_rows)

    def cell(value: Any) -> str:
        return fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in frame.columns) + " |",
        "| " + " | ".join("---" for _ in frame.columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    if len(shown) < len(frame):
        lines.append(f"\n({len(frame) - len(shown)} more rows not shown.)")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    atomic_bytes(path, lambda f: f.write(text.encode("utf-8")))


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].rstrip("_") or "claim"


def _status_word(status: Any) -> str:
    return STATUS_WORDS.get(str(status), str(status))


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


def load_table(path: str | Path) -> pd.DataFrame:
    """A saved analysis table (runs.parquet or runs.csv written by an earlier analysis).

    Lets a committed study's report be rebuilt from its table alone (``docs/study/``): the
    statistics need only the table; pictures of images show "no image" where the job
    directories are gone.
    """
    path = Path(path)
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise several types
        raise CollectError(f"featsweep.analysis: cannot read the table {str(path)!r}: "
                           f"{' '.join(str(exc).split())[:200]}") from None
    if "job.num" not in df.columns or "status" not in df.columns:
        raise CollectError(f"featsweep.analysis: {str(path)!r} is not an analysis table (it has no "
                           f"job.num and status columns); give a sweep directory or a runs.parquet.")
    if "job.sweep" not in df.columns:
        df.insert(df.columns.get_loc("job.dir") + 1 if "job.dir" in df else 1, "job.sweep", ".")
    df.attrs["sweep_dir"] = str(path.parent.resolve())
    return df


# --------------------------------------------------------------------------------------------
# Sweeps: how many, what was planned, what is missing


def sweep_status(df: pd.DataFrame, root: Path | None) -> pd.DataFrame:
    """One row per sweep of the table: ``sweep``, ``jobs`` (directories), ``planned`` (NaN when
    unknown), ``missing`` (planned jobs without a directory), ``statuses`` (text) and
    ``missing_jobs`` (a list of (number, overrides)) and ``note``."""
    rows = []
    for sweep, part in df.groupby("job.sweep", sort=True):
        counts = part["status"].astype(str).map(_status_word).value_counts()
        row: dict[str, Any] = {"sweep": sweep, "jobs": len(part), "planned": math.nan,
                               "missing": 0, "statuses": ", ".join(f"{n} {s}" for s, n in counts.items()),
                               "missing_jobs": [], "note": ""}
        if root is not None:
            plan = planned_jobs(root if sweep == "." else root / str(sweep))
            if plan.jobs:
                on_disk = [str(o).split() for o in part["job.overrides"].fillna("")]
                gone = missing_jobs(plan, on_disk)
                row.update(planned=len(plan.jobs), missing=len(gone), missing_jobs=gone)
            else:
                row["note"] = plan.note
        rows.append(row)
    return pd.DataFrame(rows, columns=["sweep", "jobs", "planned", "missing", "statuses",
                                       "missing_jobs", "note"])


def _sweeps_section(sweeps: pd.DataFrame) -> list[str]:
    lines: list[str] = []
    if len(sweeps) > 1:
        lines += [f"**This folder holds {len(sweeps)} sweeps**; they are analysed as one table "
                  "(claims pair jobs across them only where every setting matches). Jobs per "
                  "sweep:", "",
                  markdown_table(pd.DataFrame({
                      "sweep": sweeps["sweep"], "job dirs": sweeps["jobs"],
                      "planned": sweeps["planned"], "missing": sweeps["missing"],
                      "statuses": sweeps["statuses"]})), ""]
    for row in sweeps.to_dict("records"):
        if row["missing"]:
            where = "" if len(sweeps) == 1 else f" (sweep `{row['sweep']}`)"
            lines += [f"**Incomplete sweep{where}: {row['missing']} of {int(row['planned'])} "
                      f"planned jobs have no directory** (killed, or still to come):", "",
                      markdown_table(pd.DataFrame({
                          "job": [n for n, _ in row["missing_jobs"]],
                          "overrides": [" ".join(o) for _, o in row["missing_jobs"]]}),
                          max_rows=MAX_TABLE_ROWS), ""]
    return lines


# --------------------------------------------------------------------------------------------
# Sections


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
    first = parse_overrides(df["job.overrides"].iloc[0])
    common = [k for k in first if k not in factors]
    if common:
        lines += ["Given to every job: `" + " ".join(f"{k}={first[k]}" for k in common) + "`", ""]
    fixed, varying = [], []
    for column in config_columns(df):
        values = {canon(v) for v in df[column]}
        (fixed if len(values) <= 1 else varying).append(column)
    if fixed:
        lines += ["Held fixed in every job:", "", markdown_table(pd.DataFrame({
            "setting": fixed, "value": [fmt(df[c].iloc[0]) for c in fixed]})), ""]
    hidden = [c for c in varying if c not in factors]
    if hidden:
        lines += [f"Config leaves that vary: {', '.join(f'`{c}`' for c in varying)}.", ""]
    devices = sorted({str(d) for d in df.get("result.device", pd.Series(dtype=object)).dropna()})
    seconds = pd.to_numeric(df.get("result.seconds", pd.Series(dtype=float)), errors="coerce")
    if devices:
        lines += [f"Device(s): {', '.join(devices)}. Reported seconds per job: median "
                  f"{fmt(seconds.median())}, max {fmt(seconds.max())} (a batch's jobs share "
                  f"one time).", ""]
    lines += diversity_summary(df)
    return lines


def _status_section(df: pd.DataFrame) -> list[str]:
    words = df["status"].astype(str).map(_status_word)
    counts = words.value_counts()
    lines = ["## Status", "", markdown_table(pd.DataFrame({"status": counts.index,
                                                           "jobs": counts.to_numpy()})), ""]
    bad = df[df["status"].astype(str) != "ok"]
    if len(bad):
        keys = list(swept_factors(df))
        lines += ["Jobs that did not finish ok (*running*: no result.json yet and a file written "
                  "in the last 15 minutes; *incomplete*: no result.json and nothing written "
                  "since; *not started*: rejected before it ran; running ones are analysed as "
                  "they stand):", "",
                  markdown_table(pd.DataFrame({
                      "job": bad["job.num"].to_numpy(),
                      "overrides": [factor_label(parse_overrides(o), keys) or o
                                    for o in bad["job.overrides"]],
                      "status": [_status_word(s) for s in bad["status"]],
                      "error": [textwrap.shorten(str(e), 160) if isinstance(e, str) else "–"
                                for e in bad.get("result.error", [None] * len(bad))],
                  }), max_rows=MAX_TABLE_ROWS), ""]
    if "result.flag" in df:
        flagged = df[df["status"].astype(str).eq("ok") & df["result.flag"].notna()
                     & df["result.flag"].astype(str).ne("")]
        if len(flagged):
            keys = list(swept_factors(df))
            messages = flagged.get("result.flag_message", pd.Series([None] * len(flagged)))
            lines += [f"{len(flagged)} finished job(s) are flagged (written and analysed, but "
                      "look before trusting them):", "",
                      markdown_table(pd.DataFrame({
                          "job": flagged["job.num"].to_numpy(),
                          "overrides": [factor_label(parse_overrides(o), keys) or o
                                        for o in flagged["job.overrides"]],
                          "flag": flagged["result.flag"].to_numpy(),
                          "why": [textwrap.shorten(str(m), 200) if isinstance(m, str) else "–"
                                  for m in messages],
                      }), max_rows=MAX_TABLE_ROWS), ""]
    return lines


def _runs_table(df: pd.DataFrame) -> pd.DataFrame:
    keys = list(swept_factors(df))
    table = pd.DataFrame({
        "job": df["job.num"].to_numpy(),
        "overrides": [factor_label(parse_overrides(o), keys) or "–" for o in df["job.overrides"]],
        "status": [_status_word(s) for s in df["status"]],
    })
    for column, label in zip(TRACE_COLUMNS, ("act@0", "act@10%", "act@50%", "act@100%")):
        table[label] = df[column].to_numpy()
    if "trace.converged" in df:
        table["converged"] = df["trace.converged"].to_numpy()
    for metric in ("brightness", "contrast", "hf_energy", "sharpness"):
        table[f"display.{metric}"] = df[f"display.{metric}"].to_numpy()
    return table


def _convergence_lines(df: pd.DataFrame) -> list[str]:
    if "trace.converged" not in df:
        return []
    flags = [canon(v) for v in df["trace.converged"]]
    yes = sum(1 for f in flags if f == ("bool", True))
    no = sum(1 for f in flags if f == ("bool", False))
    if not yes + no:
        return []
    text = (f"Convergence: {yes} of {yes + no} job(s) with a trace converged (activation rose by "
            f"less than {CONVERGED_GAIN:.0%} of its final value over the last 10 % of steps"
            f"{'' if no == 0 else f'; {no} were still rising'}).")
    return [text, ""]


def verdict_table(results: pd.DataFrame) -> pd.DataFrame:
    """The claims table as it reads in a report: one row per claim, numbers formatted."""
    rows = []
    for r in results.to_dict("records"):
        tested = r["verdict"] not in (NOT_IN_SWEEP, "no data")
        stat = (f"{'ρ' if r['test'] == 'spearman' else 'Δ'} = {fmt(r['statistic'])} "
                f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]") if tested else "–"
        effect = (f"{fmt(r['effect'])} [{fmt(r['effect_low'])}, {fmt(r['effect_high'])}]"
                  if tested else "–")
        flags = []
        if str(r.get("monotone", "")).startswith("no"):
            flags.append("not monotone")
        elif str(r.get("monotone", "")).startswith("doubtful"):
            flags.append("monotone?")
        unconverged = r.get("n_unconverged")
        if isinstance(unconverged, float) and unconverged > 0:
            flags.append(f"{int(unconverged)} unconverged")
        verdict = r["verdict"]
        if r.get("reason"):
            verdict += f" ({r['reason']})"
        rows.append({
            "claim": r["claim"], "factor": r["factor"], "metric": r["metric"],
            "expected": r["direction"], "levels": r["levels"] or "–",
            "units": f"{r['n_units']} {r['unit']}" if tested else "–",
            "groups": r["n_groups"], "jobs": r["n_jobs"], "statistic [95 % CI]": stat,
            "effect [95 % CI]": effect, "floor": fmt(r["min_effect"]) if tested else "–",
            "verdict": verdict, "Holm": r.get("verdict_holm") or "–",
            "flags": ", ".join(flags) or "–",
        })
    return pd.DataFrame(rows, columns=["claim", "factor", "metric", "expected", "levels", "units",
                                       "groups", "jobs", "statistic [95 % CI]", "effect [95 % CI]",
                                       "floor", "verdict", "Holm", "flags"])


_TABLE_TERMS = {
    "units": "n_units and unit", "groups": "n_groups", "jobs": "n_jobs",
    "statistic [95 % CI]": "statistic", "effect [95 % CI]": "effect", "floor": "min_effect",
    "verdict": "verdict", "Holm": "verdict_holm",
}


def _definitions() -> list[str]:
    lines = ["What each column means (claims.csv has the same names; the report's short names "
             "are in brackets):", ""]
    back = {v: k for k, v in _TABLE_TERMS.items()}
    for name, text in COLUMN_DEFINITIONS.items():
        short = back.get(name)
        lines.append(f"- `{name}`{f' ({short})' if short and short != name else ''}: {text}.")
    lines += ["- flags: *not monotone* / *monotone?* (see `monotone`), *N unconverged* (see "
              "`n_unconverged`).", ""]
    return lines


def _claim_section(df: pd.DataFrame, claim: Claim, row: dict[str, Any], figure: str, sheet: str,
                   n_boot: int) -> list[str]:
    lines = [f"### {claim.name}", ""]
    verdict = row["verdict"] + (f" — {row['reason']}" if row.get("reason") else "")
    lines += [f"**{verdict}** (Holm: {row.get('verdict_holm') or '–'}); "
              f"{row['n_units']} unit(s) of `{row['unit']}`, {row['n_groups']} paired group(s), "
              f"{row['n_jobs']} job(s); floor ±{fmt(row['min_effect'])}.", ""]
    if row.get("dropped"):
        lines += [f"Left out: {row['dropped']}.", ""]
    if row.get("note"):
        lines += [f"Note: {row['note']}.", ""]
    lines += [f"![{claim.metric} against {claim.factor}]({figure})", ""]
    if row["test"] == "spearman":
        levels = level_table(df, claim, n_boot=n_boot)
        if len(levels) >= 2:
            lines += ["Per factor value: mean over units with its 95 % CI, and the paired step from "
                      "the previous value (a step against the trend whose CI excludes 0 makes the "
                      "relation not monotone):", "", markdown_table(levels), ""]
    lines += [f"![{claim.name}: images by level and group]({sheet})", ""]
    groups = group_table(df, claim)
    if len(groups):
        lines += [markdown_table(groups, max_rows=20), ""]
    return lines


# --------------------------------------------------------------------------------------------
# The report


def write_report(
    sweep_dir: str | Path,
    *,
    claims_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    n_boot: int = N_BOOT,
    quality: bool = False,
    natural_dir: str | Path | None = None,
) -> Path:
    """Analyse a sweep and write ``out_dir`` (default ``SWEEP_DIR/analysis/``); returns report.md.

    Args:
        sweep_dir: the sweep directory, or a saved runs.parquet / runs.csv (:func:`load_table`;
            the output then defaults to ``analysis/`` beside it).
        claims_file: claims YAML (default: the notes' claims shipped with featsweep).
        out_dir: output directory.
        n_boot: bootstrap resamples per claim.
        quality: also compute ``quality.*`` per job and the dataset examples
            (:mod:`featsweep.quality`; loads each job's model).
        natural_dir: folder of natural images for ``quality.natural_ratio`` and the dataset
            examples (default: scikit-image's bundled photographs).

    Files: runs.parquet, runs.csv (the table), claims.csv (:func:`claims_table`),
    contact_sheet.png, activation.png, claim_NN_<slug>.png and sheet_NN_<slug>.png (one each per
    tested claim) and report.md. Every file is written atomically. Works on a sweep still
    running: jobs without result.json are listed as running.

    Raises:
        CollectError: no such directory, or no job in it.
        ClaimsError: the claims file is malformed or names columns the table lacks (checked
            before any output is written).
    """
    source_path = Path(sweep_dir)
    claims = load_claims(notes_claims_path() if claims_file is None else claims_file)
    from_table = source_path.is_file()
    df = load_table(source_path) if from_table else collect(source_path)
    sweep = source_path.parent if from_table else source_path
    out = sweep / "analysis" if out_dir is None else Path(out_dir)
    examples: dict[str, Any] = {}
    if quality and not from_table:
        from featsweep.quality import add_quality

        df, examples = add_quality(df, natural_dir=natural_dir, out_dir=out)
    claims = expand_by(claims, df)  # one claim per parameterization etc. (claims' ``by``)
    results = claims_table(df, claims, n_boot=n_boot)
    out.mkdir(parents=True, exist_ok=True)

    def parquet(f: Any) -> None:
        _parquet_ready(df).to_parquet(f, index=False)

    _write_text(out / "runs.csv", df.to_csv(index=False))
    if not (from_table and (out / "runs.parquet").resolve() == source_path.resolve()):
        atomic_bytes(out / "runs.parquet", parquet)
    _write_text(out / "claims.csv", results.to_csv(index=False))

    many = len(df) > MAX_MAIN_SHEET
    save_figure(contact_sheet(df, max_images=MAX_MAIN_SHEET if many else len(df)),
                out / "contact_sheet.png")
    save_figure(activation_curves(df), out / "activation.png")

    pictures: dict[str, tuple[str, str]] = {}
    wanted: set[str] = set()
    for number, (claim, row) in enumerate(zip(claims, results.to_dict("records")), start=1):
        if row["verdict"] == NOT_IN_SWEEP:
            continue
        figure = f"claim_{number:02d}_{_slug(claim.name)}.png"
        sheet = f"sheet_{number:02d}_{_slug(claim.name)}.png"
        save_figure(claim_figure(df, claim, row), out / figure)
        save_figure(claim_sheet(df, claim), out / sheet)
        pictures[claim.name] = (figure, sheet)
        wanted |= {figure, sheet}
    for pattern in ("claim_*.png", "sheet_*.png"):
        for stale in out.glob(pattern):
            if stale.name not in wanted:
                stale.unlink(missing_ok=True)

    root = None if from_table else sweep
    sweeps = sweep_status(df, root)
    words = df["status"].astype(str).map(_status_word).value_counts()
    status_text = ", ".join(f"{n} {s}" for s, n in words.items())
    missing = int(sweeps["missing"].sum())
    planned = sweeps["planned"].sum(min_count=1)
    source = "featsweep's notes claims (featsweep/claims/notes.yaml)" if claims_file is None \
        else f"`{claims_file}`"
    where = (f"Table `{source_path.resolve()}` (rebuilt from a saved table: job directories and "
             f"their images are not read)" if from_table else f"Sweep directory `{sweep.resolve()}`")
    complete = (f" **Incomplete: {missing} of {int(planned)} planned jobs have no directory.**"
                if missing else "")
    lines = [
        f"# Sweep analysis: `{sweep.resolve().name}`", "",
        f"{where}: {len(df)} job(s), {status_text}.{complete} "
        f"Tables: [runs.csv](runs.csv) ([runs.parquet](runs.parquet)), one row per job; "
        f"[claims.csv](claims.csv), one row per claim.", "",
    ]
    lines += _sweeps_section(sweeps)
    lines += _settings_section(df)
    lines += _status_section(df)
    factors = swept_factors(df)
    shown = (f" The first {MAX_MAIN_SHEET} of {len(df)} jobs are shown; each claim below has its "
             f"own sheet (levels as columns, paired groups as rows).") if many else ""
    lines += ["## Images", "",
              "![Contact sheet: each job's image.png](contact_sheet.png)", "",
              "Each image is the display image (min-max stretched, as the notes showed it), titled "
              "with its job number and final activation"
              + (f"; rows and columns are the swept overrides ({', '.join(factors)})." if factors
                 else ".") + shown, ""]
    if examples:
        from featsweep.quality import examples_section

        lines += examples_section(examples)
    lines += ["## Activation", "",
              "![Activation against step for every job](activation.png)", ""]
    lines += _convergence_lines(df)
    lines += ["Activation at 0, 10, 50 and 100 % of the recorded steps, and a few display metrics "
              "(all metrics in runs.csv):", "",
              markdown_table(_runs_table(df), max_rows=MAX_TABLE_ROWS), ""]
    tested = int((~results["verdict"].isin([NOT_IN_SWEEP])).sum())
    lines += ["## Claims", "",
              f"Claims from {source}: {len(results)} in all, {tested} testable in this sweep. "
              "Jobs are paired within groups that hold every other setting equal; each group gives "
              "Spearman ρ (ordered factor) or B − A (two levels) and an effect in the metric's "
              "units. The bootstrap resamples the claim's unit (default `target.channel`: a claim "
              f"is about channels in general), then groups within a unit, {n_boot:,} times; "
              f"*supported* / *contradicted* need at least {MIN_GROUPS} units and a 95 % CI "
              "that excludes 0, *negligible* means the effect's CI lies inside ± the floor (the "
              "seed-to-seed spread at fixed settings unless the claim sets `min_effect`). Holm's "
              "column adjusts for testing the file's claims together.", "",
              markdown_table(verdict_table(results)), ""]
    lines += _definitions()
    for claim, row in zip(claims, results.to_dict("records")):
        if claim.name in pictures:
            lines += _claim_section(df, claim, row, *pictures[claim.name], n_boot=n_boot)
    report = out / "report.md"
    _write_text(report, "\n".join(lines).rstrip() + "\n")
    return report
