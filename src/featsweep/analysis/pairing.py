"""Pairing: from the analysis table to one number per paired group, for one claim.

Jobs are grouped so that within a group every config leaf but the factor (and the claim's
``ignore`` columns) is equal: same seed, channel, layer, other settings. Each group is a paired
comparison on the same random start, so differences between seeds or channels, often far larger
than the effect, cancel out. Per group the statistic is

* ``difference`` — mean metric at level B minus at level A, when the claim gives ``levels: [A, B]``
  or the factor is boolean, or non-numeric with exactly two values (then A, B are the sorted
  values: ``false`` before ``true``, strings alphabetically);
* ``spearman`` — Spearman's ρ between factor and metric (:func:`scipy.stats.spearmanr`, average
  ranks for ties) when the factor is numeric. A group needs two distinct factor values and a
  metric that is not constant within it, else ρ is undefined and the group is dropped (and
  counted). With two levels ρ is the sign of the paired difference; the bootstrap does the rest.

``effect`` is in the metric's units: B − A, or the metric at the group's highest factor value
minus at its lowest. Every group lies in one *unit* (the claim's ``unit`` column, default
``target.channel``), since the unit is a config leaf held equal within a group.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from featsweep.analysis.claim import DEFAULT_UNIT, Claim, filtered_rows
from featsweep.analysis.columns import config_columns
from featsweep.analysis.values import NULL, canon, show

__all__ = [
    "ALL_GROUP", "GROUP_TABLE_COLUMNS", "SEED_COLUMN", "Paired", "group_table", "pair",
    "paired_frame",
]

GROUP_TABLE_COLUMNS: tuple[str, ...] = ("group", "unit", "statistic", "effect", "n_jobs")
ALL_GROUP = "all"  # group key when no config column varies besides the factor
SEED_COLUMN = "seed"  # the config leaf whose spread at fixed settings is the default floor


@dataclass
class Paired:
    """Usable rows of one claim, its groups and what was left out.

    Attributes:
        rows: the table's usable rows, with ``group`` and ``unit`` (text) as first columns.
        test: ``spearman`` or ``difference``.
        levels_text: ``"B − A"`` or the factor values used (``"0 < 1e-05 < 0.1"``).
        per_group: :data:`GROUP_TABLE_COLUMNS`, groups in a deterministic (sorted key) order.
        level_means: groups × factor values (x: 0/1 for a difference, the number for spearman),
            the group's mean metric at each value (NaN where the group lacks it); same group order.
        unit: the unit column actually used (None: each group is its own unit).
        unit_note: why the claim's unit was not used as given ("" when it was).
        dropped: reason → number of groups dropped for it.
        excluded: reason → number of jobs left out before grouping.
        seed_sd: pooled seed-to-seed standard deviation of the metric at fixed settings
            (metric units; NaN when no setting was run with two seeds), and ``seed_sets`` the
            number of settings it pools.
    """

    rows: pd.DataFrame
    test: str
    levels_text: str
    per_group: pd.DataFrame
    level_means: pd.DataFrame
    unit: str | None
    unit_note: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    seed_sd: float = float("nan")
    seed_sets: int = 0


def _levels_text(levels: tuple[tuple, tuple]) -> str:
    return f"{show(levels[1])} − {show(levels[0])}"


def _count(counter: Counter, reason: str, n: int) -> None:
    if n:
        counter[reason] += int(n)


def pair(df: pd.DataFrame, claim: Claim, group_columns: Sequence[str] | None = None) -> Paired | str:
    """Select, group and reduce the rows of ``claim``; a string explains why there is no data.

    Args:
        df: the analysis table (:func:`featsweep.analysis.collect`).
        claim: the claim.
        group_columns: columns held equal within a group; default every config column.
    """
    for key, column in [("factor", claim.factor), ("metric", claim.metric)] + [
        ("filter", c) for c in claim.filters
    ]:
        if column not in df.columns:
            return f"{key} column {column!r} is not in the table"
    excluded: Counter = Counter()

    # Only finished jobs: a diverged or failed job's image says nothing about the setting.
    rows = filtered_rows(df, claim)
    if "status" in rows.columns:
        ok = (rows["status"].astype(str) == "ok").to_numpy()
        _count(excluded, "status not ok", (~ok).sum())
        rows = rows[ok]
    metric = pd.to_numeric(rows[claim.metric], errors="coerce").astype(float).to_numpy()
    _count(excluded, "metric not finite", (~np.isfinite(metric)).sum())
    rows = rows[np.isfinite(metric)]
    factor = [canon(v) for v in rows[claim.factor].tolist()]
    keep = np.array([c != NULL for c in factor], dtype=bool)
    _count(excluded, "factor unset", (~keep).sum())
    rows, factor = rows[keep], [c for c, k in zip(factor, keep) if k]
    if rows.empty:
        why = "; ".join(f"{n} {r}" for r, n in excluded.items())
        return "no finished job with a finite metric passes the filters" + (f" ({why})" if why else "")

    # Which test: given levels, or what the factor's values allow.
    kinds = {c[0] for c in factor}
    if claim.levels is not None:
        levels: tuple[tuple, tuple] | None = (canon(claim.levels[0]), canon(claim.levels[1]))
    elif kinds == {"num"}:
        levels = None
    else:
        distinct = sorted(set(factor))
        if len(distinct) != 2:
            return (
                f"factor {claim.factor} is not numeric and has {len(distinct)} value(s) "
                f"({', '.join(show(v) for v in distinct)}); a difference needs 'levels: [A, B]'"
            )
        levels = (distinct[0], distinct[1])

    if levels is not None:
        test = "difference"
        index_of = {levels[0]: 0.0, levels[1]: 1.0}
        keep = np.array([c in index_of for c in factor], dtype=bool)
        _count(excluded, "factor at another level", (~keep).sum())
        rows = rows[keep]
        x = np.array([index_of[c] for c in factor if c in index_of], dtype=float)
        if rows.empty:
            return "no finished job is at either level"
    else:
        test = "spearman"
        x = np.array([c[1] for c in factor], dtype=float)
    y = pd.to_numeric(rows[claim.metric], errors="coerce").to_numpy(dtype=float)

    # Pair: every config column except the factor and the ignored ones is held equal. Columns
    # constant over the usable rows do not split anything, so they are left out of the key text.
    candidates = list(group_columns) if group_columns is not None else config_columns(df)
    absent = [c for c in candidates if c not in df.columns]
    if absent:
        return f"group column(s) {absent!r} are not in the table"
    skip = {claim.factor, *claim.ignore}
    keyed: list[str] = []
    canon_cols: list[list[tuple]] = []
    for column in candidates:
        if column in skip:
            continue
        values = [canon(v) for v in rows[column].tolist()]
        if len(set(values)) > 1:
            keyed.append(column)
            canon_cols.append(values)
    n = len(rows)
    if keyed:
        # A missing value (e.g. momentum for Adam) is a value of its own, not a reason to drop.
        key_tuples = list(zip(*canon_cols))
        text_of = {t: ", ".join(f"{col}={show(v)}" for col, v in zip(keyed, t)) for t in set(key_tuples)}
        order = {t: i for i, t in enumerate(sorted(text_of))}
        group_text = [text_of[t] for t in key_tuples]
        group_rank = np.array([order[t] for t in key_tuples], dtype=int)
    else:
        group_text = [ALL_GROUP] * n
        group_rank = np.zeros(n, dtype=int)

    # The unit each row (so each group) belongs to.
    unit, unit_note = claim.unit, ""
    if unit is not None and unit not in rows.columns:
        unit_note = (f"unit column {unit} is not in the table: each paired group counts as a unit"
                     if unit == DEFAULT_UNIT else f"unit column {unit} is not in the table")
        unit = None
    elif unit is not None and unit not in candidates:
        unit_note = f"unit {unit} is not held equal within groups: each paired group counts as a unit"
        unit = None
    if unit is not None:
        unit_values = [canon(v) for v in rows[unit].tolist()]
        unit_text = [f"{unit}={show(v)}" for v in unit_values]
    else:
        unit_text = list(group_text)

    work = pd.DataFrame({"rank": group_rank, "x": x, "y": y})
    means = work.groupby(["rank", "x"])["y"].mean().unstack("x").sort_index(axis=1)
    dropped: Counter = Counter()
    stat = pd.Series(np.nan, index=means.index, dtype=float)
    effect = pd.Series(np.nan, index=means.index, dtype=float)
    if test == "difference":
        for level in (0.0, 1.0):
            if level not in means.columns:
                means[level] = np.nan
        means = means[[0.0, 1.0]]
        diff = means[1.0] - means[0.0]
        has_both = np.isfinite(diff.to_numpy())
        _count(dropped, "one level missing", (~has_both).sum())
        stat, effect = diff, diff
        levels_text = _levels_text(levels)  # type: ignore[arg-type]
    else:
        for rank, part in work.groupby("rank", sort=True):
            px, py = part["x"].to_numpy(), part["y"].to_numpy()
            if np.unique(px).size < 2:
                dropped["one factor value only"] += 1
                continue
            if np.ptp(py) == 0:
                dropped["metric constant"] += 1
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant inputs are caught above
                stat[rank] = stats.spearmanr(px, py).statistic
            row = means.loc[rank].dropna()
            effect[rank] = row.iloc[-1] - row.iloc[0]  # at the highest factor value minus lowest
        levels_text = ""
    good = np.isfinite(stat.to_numpy(dtype=float))
    stat, effect = stat[good], effect[good]
    used = work["rank"].isin(stat.index).to_numpy()
    if not stat.size:
        why = (
            "no group has both levels" if test == "difference"
            else "no group has two factor values and a non-constant metric"
        )
        detail = ", ".join(f"{r} ({k})" for r, k in dropped.items())
        return (f"{why} ({len(rows)} usable job(s); groups hold equal: {', '.join(keyed) or 'nothing'}"
                + (f"; dropped: {detail}" if detail else "") + ")")
    if test == "spearman":
        levels_text = " < ".join(show(("num", v)) for v in sorted(set(x[used])))

    # Name groups by the columns that still vary among the groups used (the arms that were
    # dropped, e.g. other one-factor-at-a-time arms, no longer lengthen every key).
    if keyed:
        shown = [i for i, col in enumerate(keyed)
                 if len({canon_cols[i][r] for r in np.flatnonzero(used)}) > 1] or list(range(len(keyed)))
        group_text = [", ".join(f"{keyed[i]}={show(t[i])}" for i in shown) or ALL_GROUP
                      for t in key_tuples]
        if unit is None:
            unit_text = list(group_text)
    texts = pd.Series(group_text).groupby(group_rank).first()
    units = pd.Series(unit_text).groupby(group_rank).first()
    counts = work[used].groupby("rank").size()
    per_group = pd.DataFrame({
        "group": texts.loc[stat.index].to_numpy(),
        "unit": units.loc[stat.index].to_numpy(),
        "statistic": stat.to_numpy(dtype=float),
        "effect": effect.to_numpy(dtype=float),
        "n_jobs": counts.loc[stat.index].to_numpy(dtype=int),
    })
    level_means = means.loc[stat.index].reset_index(drop=True)
    out = rows[used].copy()
    out.insert(0, "unit", np.asarray(unit_text, dtype=object)[used])
    out.insert(0, "group", np.asarray(group_text, dtype=object)[used])
    seed_sd, seed_sets = _seed_spread(rows, keyed, x, y)
    return Paired(rows=out, test=test, levels_text=levels_text, per_group=per_group,
                  level_means=level_means, unit=unit, unit_note=unit_note, dropped=dict(dropped),
                  excluded=dict(excluded), seed_sd=seed_sd, seed_sets=seed_sets)


def _seed_spread(rows: pd.DataFrame, keyed: Sequence[str], x: np.ndarray,
                 y: np.ndarray) -> tuple[float, int]:
    """Pooled within-setting standard deviation of ``y`` over seeds, and how many settings.

    A setting is every varying config column but the seed, plus the factor value ``x``; the
    pooled variance is Σ (n_i − 1) s_i² / Σ (n_i − 1) over settings run with ≥ 2 seeds.
    """
    if SEED_COLUMN not in keyed:
        return float("nan"), 0
    keys = [col for col in keyed if col != SEED_COLUMN]
    frame = pd.DataFrame({"x": x, "y": y})
    for i, col in enumerate(keys):
        frame[f"k{i}"] = [show(canon(v)) for v in rows[col].tolist()]
    grouped = frame.groupby(["x", *(f"k{i}" for i in range(len(keys)))])["y"]
    n = grouped.size()
    var = grouped.var(ddof=1)
    ok = (n >= 2).to_numpy()
    dof = (n[ok] - 1).sum()
    if dof <= 0:
        return float("nan"), 0
    return float(np.sqrt(((n[ok] - 1) * var[ok]).sum() / dof)), int(ok.sum())


def paired_frame(df: pd.DataFrame, claim: Claim, *, group_columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The table's rows that enter ``claim``'s test, with leading ``group`` and ``unit`` columns.

    Only jobs with status ``ok``, a finite metric, passing the filters, at one of the levels (if
    given) and in a group that yields a statistic. Empty (with the table's columns) if none.
    """
    paired = pair(df, claim, group_columns)
    if isinstance(paired, str):
        empty = df.iloc[0:0].copy()
        empty.insert(0, "unit", pd.Series(dtype=object))
        empty.insert(0, "group", pd.Series(dtype=object))
        return empty
    return paired.rows


def group_table(df: pd.DataFrame, claim: Claim, *, group_columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per group: ``group`` (key text, e.g. ``seed=0, target.channel=7``), ``unit``,
    ``statistic`` (ρ or B − A), ``effect`` (metric units) and ``n_jobs``. Empty if no data."""
    paired = pair(df, claim, group_columns)
    if isinstance(paired, str):
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("group", "unit") else float)
                             for c in GROUP_TABLE_COLUMNS})
    return paired.per_group
