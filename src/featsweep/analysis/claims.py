"""Claims -> verdicts: the public face of the claim schema, the pairing and the statistics.

A claim (:mod:`.claim`) is paired into groups (:mod:`.pairing`), each group gives ρ or B − A and
an effect in metric units, and :mod:`.stats` resamples units (default ``target.channel``) then
groups within them. Per claim, :func:`evaluate` reports (columns :data:`RESULT_COLUMNS`, each
defined in :data:`COLUMN_DEFINITIONS`):

* the statistic with its 95 % CI and p-value, and the effect with its CI, in metric units;
* the effect-size floor (the claim's ``min_effect``, else the seed-to-seed spread at fixed
  settings) — an effect CI wholly inside ±floor is ``negligible``;
* the verdict, and beside it the verdict after Holm's adjustment over the claims evaluated
  together (one file);
* for ordered factors whether the per-level means are monotone (:func:`level_table`);
* how many groups were dropped and why, how many arms did not converge, and the reason when the
  verdict is not decisive.

The bootstrap RNG is seeded from ``seed`` and the claim's name, so a claim's result does not
depend on which other claims are evaluated with it, nor on the order of the table's rows (Holm's
adjusted column does depend on the family, by design).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from featsweep.analysis.claim import (
    CLAIM_KEYS,
    DEFAULT_UNIT,
    DIRECTIONS,
    REQUIRED_KEYS,
    Claim,
    ClaimsError,
    claim_problems,
    expand_by,
    filtered_rows,
    load_claims,
    notes_claims_path,
    validate_claims,
)
from featsweep.analysis.pairing import ALL_GROUP, GROUP_TABLE_COLUMNS, Paired, group_table, pair, paired_frame
from featsweep.analysis.stats import CI_LEVEL, MIN_GROUPS, N_BOOT, decide, hierarchical_bootstrap, holm
from featsweep.analysis.values import NULL, canon, show

__all__ = [
    "ALL_GROUP", "CI_LEVEL", "CLAIMS_COLUMNS", "CLAIM_KEYS", "COLUMN_DEFINITIONS", "DEFAULT_UNIT",
    "DIRECTIONS", "GROUP_TABLE_COLUMNS", "LEVEL_TABLE_COLUMNS", "MIN_GROUPS", "N_BOOT",
    "NOT_IN_SWEEP", "REQUIRED_KEYS", "RESULT_COLUMNS", "VERDICTS", "Claim", "ClaimsError",
    "canon", "claim_problems", "claims_table", "evaluate", "expand_by", "group_table", "level_table",
    "load_claims", "notes_claims_path", "paired_frame", "show", "validate_claims",
]

TESTS: tuple[str, ...] = ("spearman", "difference")
NOT_IN_SWEEP = "not in this sweep"
VERDICTS: tuple[str, ...] = (
    "supported", "contradicted", "negligible", "inconclusive", "differs (+)", "differs (−)",
    "no data", NOT_IN_SWEEP,
)
# Output of :func:`evaluate`, in this order.
RESULT_COLUMNS: tuple[str, ...] = (
    "claim", "factor", "metric", "direction", "test", "levels", "unit", "n_units", "n_groups",
    "n_jobs", "statistic", "ci_low", "ci_high", "p_value", "effect", "effect_low", "effect_high",
    "min_effect", "verdict", "p_holm", "verdict_holm", "monotone", "n_unconverged", "dropped",
    "reason",
)
CLAIMS_COLUMNS: tuple[str, ...] = (*RESULT_COLUMNS, "note")  # :func:`claims_table`
LEVEL_TABLE_COLUMNS: tuple[str, ...] = (
    "level", "n_units", "n_groups", "mean", "ci_low", "ci_high", "step", "step_low", "step_high",
)
COLUMN_DEFINITIONS: dict[str, str] = {
    "claim": "the sentence tested",
    "factor": "the config leaf varied",
    "metric": "the outcome column measured",
    "direction": "what the sentence asserts: increase, decrease, or any (two-sided)",
    "test": "spearman (ordered factor: ρ per group) or difference (two levels: B − A per group)",
    "levels": "the factor values compared: 'B − A', or the ordered values used",
    "unit": "what the claim generalizes over (resampled first); 'group' when each paired group "
            "is its own unit",
    "n_units": "units with at least one paired group; the minimum applies to this count",
    "n_groups": "paired groups used (jobs equal in every setting but the factor)",
    "n_jobs": "jobs in those groups",
    "statistic": "mean over units of the units' mean ρ (spearman) or B − A (difference)",
    "ci_low": f"lower end of the {CI_LEVEL:.0%} CI of the statistic (hierarchical bootstrap: "
              "units, then groups within units; expanded percentile)",
    "ci_high": "upper end of that CI",
    "p_value": "two-sided p-value of statistic = 0, consistent with the CI",
    "effect": "the same mean of the per-group change in the metric's units: metric at B minus "
              "at A, or at the group's highest factor value minus at its lowest",
    "effect_low": "lower end of the effect's CI (same resamples)",
    "effect_high": "upper end of the effect's CI",
    "min_effect": "the effect-size floor (metric units): the claim's min_effect, else the pooled "
                  "seed-to-seed standard deviation of the metric at fixed settings (0: none)",
    "verdict": "supported / contradicted (CI of the statistic wholly on one side of 0, in / "
               "against the claimed direction; differs (+/−) for 'any'), negligible (effect CI "
               "wholly inside ±min_effect), inconclusive, no data, or not in this sweep",
    "p_holm": "p_value after Holm's step-down adjustment over the claims tested together",
    "verdict_holm": "the verdict with p_holm < 0.05 in place of the CI",
    "monotone": "ordered factors with 3+ levels: 'no: …' when the paired step between adjacent "
                "levels goes against the overall trend with a CI that excludes 0, 'doubtful: …' "
                "when only its estimate does, else 'yes'; empty for two levels",
    "n_unconverged": "jobs used whose activation still rose ≥ 1 % over the last 10 % of steps "
                     "(trace.converged false); empty when the table has no trace.converged",
    "dropped": "groups and jobs left out, and why",
    "reason": "why the verdict is not decisive (too few units, CI includes 0, effect inside the "
              "floor, factor does not vary, ...); empty when decisive",
    "note": "anything else worth knowing (unit fallback, non-convergence, non-monotone levels)",
}


def _claim_rng(seed: int, claim: Claim, stream: int = 0) -> np.random.Generator:
    # Seeded by the claim's name too: its CI must not depend on its neighbours in the file.
    return np.random.default_rng([int(seed), zlib.crc32(claim.name.encode("utf-8")), stream])


def _units(paired: Paired) -> np.ndarray:
    return paired.per_group["unit"].to_numpy(dtype=object)


def _unit_label(paired: Paired) -> str:
    return paired.unit if paired.unit is not None else "group"


def _dropped_text(paired: Paired) -> str:
    parts = []
    if paired.dropped:
        total = sum(paired.dropped.values())
        parts.append(f"{total} group(s): " + ", ".join(f"{r} ({n})" for r, n in paired.dropped.items()))
    if paired.excluded:
        total = sum(paired.excluded.values())
        parts.append(f"{total} job(s): " + ", ".join(f"{r} ({n})" for r, n in paired.excluded.items()))
    return "; ".join(parts)


def _levels_of(paired: Paired) -> list[float]:
    return [float(c) for c in paired.level_means.columns]


def _level_stats(paired: Paired, n_boot: int, rng: np.random.Generator) -> pd.DataFrame:
    means = paired.level_means.to_numpy(dtype=float)  # groups × levels
    steps = np.diff(means, axis=1)  # groups × (levels − 1): paired change to the next level
    boot = hierarchical_bootstrap(np.concatenate([means, steps], axis=1), _units(paired),
                                  n_boot=n_boot, rng=rng)
    levels = _levels_of(paired)
    n_lv = len(levels)
    units = _units(paired)
    rows = []
    for j, level in enumerate(levels):
        has = np.isfinite(means[:, j])
        step = (boot.estimate[n_lv + j - 1], boot.low[n_lv + j - 1], boot.high[n_lv + j - 1]) \
            if j else (np.nan, np.nan, np.nan)
        rows.append({
            "level": show(("num", level)) if paired.test == "spearman" else ("A", "B")[int(level)],
            "n_units": int(len(set(units[has]))), "n_groups": int(has.sum()),
            "mean": boot.estimate[j], "ci_low": boot.low[j], "ci_high": boot.high[j],
            "step": step[0], "step_low": step[1], "step_high": step[2],
        })
    return pd.DataFrame(rows, columns=list(LEVEL_TABLE_COLUMNS))


def level_table(df: pd.DataFrame, claim: Claim, *, n_boot: int = N_BOOT, seed: int = 0,
                group_columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Per factor value: the mean metric over units (of the groups' means) with its CI, and the
    paired step from the previous value with its CI. Columns :data:`LEVEL_TABLE_COLUMNS`.

    For a box blur's ``display.hf_energy`` this shows what ρ hides: k = 5 above k = 3. Empty if
    the claim has no data.
    """
    paired = pair(df, claim, group_columns)
    if isinstance(paired, str):
        return pd.DataFrame({c: pd.Series(dtype=object if c == "level" else float)
                             for c in LEVEL_TABLE_COLUMNS})
    return _level_stats(paired, n_boot, _claim_rng(seed, claim, 1))


def _monotone(levels: pd.DataFrame, sign: float) -> str:
    """``yes``; ``no: 3→5 rises`` when a step's CI lies against the trend's sign; ``doubtful:
    3→5 rises`` when only its estimate does (its CI includes 0)."""
    against, doubtful = [], []
    for i in range(1, len(levels)):
        step, low, high = (levels[c].iat[i] for c in ("step", "step_low", "step_high"))
        if not np.isfinite(step) or step * sign >= 0:
            continue
        text = f"{levels['level'].iat[i - 1]}→{levels['level'].iat[i]} {'rises' if step > 0 else 'falls'}"
        (against if (low > 0 or high < 0) else doubtful).append(text)
    if against:
        return "no: " + ", ".join(against)
    if doubtful:
        return "doubtful: " + ", ".join(doubtful) + " (CI includes 0)"
    return "yes"


def _no_data_row(df: pd.DataFrame, claim: Claim, verdict: str, reason: str) -> dict[str, Any]:
    test = "difference" if claim.levels is not None else "spearman"
    if claim.levels is None and claim.factor in df.columns:
        kinds = {canon(v)[0] for v in df[claim.factor].tolist()} - {"none"}
        test = "spearman" if kinds == {"num"} else "difference"
    levels = (f"{show(canon(claim.levels[1]))} − {show(canon(claim.levels[0]))}"
              if claim.levels else "")
    row: dict[str, Any] = {c: np.nan for c in RESULT_COLUMNS}
    row.update({"claim": claim.name, "factor": claim.factor, "metric": claim.metric,
                "direction": claim.direction, "test": test, "levels": levels,
                "unit": claim.unit or "group", "n_units": 0, "n_groups": 0, "n_jobs": 0,
                "verdict": verdict, "verdict_holm": verdict, "monotone": "", "dropped": "",
                "reason": reason})
    return row


def evaluate(
    df: pd.DataFrame,
    claims: Sequence[Claim],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    group_columns: Sequence[str] | None = None,
    min_groups: int = MIN_GROUPS,
) -> pd.DataFrame:
    """Test every claim on the analysis table ``df``; one row per claim, columns RESULT_COLUMNS.

    Args:
        df: the analysis table (``featsweep.analysis.collect``).
        claims: claims to test, e.g. from :func:`load_claims`; Holm's adjustment runs over them.
        n_boot: bootstrap resamples (≥ 1; default 10,000).
        seed: bootstrap RNG seed (combined with each claim's name).
        group_columns: columns held equal within a group; default every config column. The
            claim's factor and ignored columns are always excluded.
        min_groups: below this many *units* the verdict is ``inconclusive`` whatever the CI.

    Column meanings: :data:`COLUMN_DEFINITIONS`. A claim with no usable group gets verdict
    ``no data``, NaN numbers and counts 0; why is in ``reason``, in
    ``result.attrs["notes"][claim.name]`` and in a warning. Never raises on data; call
    :func:`validate_claims` first to catch typos.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    records: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    remarks: dict[str, str] = {}
    significant: list[bool] = []
    for claim in claims:
        paired = pair(df, claim, group_columns)
        if isinstance(paired, str):
            notes[claim.name] = paired
            warnings.warn(f"claim {claim.name!r}: no data: {paired}", stacklevel=2)
            records.append(_no_data_row(df, claim, "no data", paired))
            significant.append(False)
            continue
        table = paired.per_group
        boot = hierarchical_bootstrap(table[["statistic", "effect"]].to_numpy(dtype=float),
                                      _units(paired), n_boot=n_boot, rng=_claim_rng(seed, claim))
        stat, effect = float(boot.estimate[0]), float(boot.estimate[1])
        if claim.min_effect is not None:
            floor = claim.min_effect
        else:
            floor = paired.seed_sd if np.isfinite(paired.seed_sd) else 0.0
        excludes = bool(boot.low[0] > 0 or boot.high[0] < 0)
        verdict, reason = decide(
            claim.direction, stat, float(boot.low[0]), float(boot.high[0]), significant=excludes,
            effect_low=float(boot.low[1]), effect_high=float(boot.high[1]), floor=floor,
            n_units=boot.n_units, min_units=min_groups)
        values = pd.to_numeric(paired.rows[claim.metric], errors="coerce").to_numpy(dtype=float)
        if values.size and np.ptp(values) == 0:
            verdict, reason = "inconclusive", f"metric constant ({values[0]:.4g} in all {values.size} jobs)"
        extra: list[str] = []
        if paired.unit_note:
            extra.append(paired.unit_note)
        if claim.min_effect is None and not np.isfinite(paired.seed_sd):
            extra.append("no effect floor: no setting was run with two seeds")
        monotone = ""
        if paired.test == "spearman" and paired.level_means.shape[1] >= 3:
            levels = _level_stats(paired, n_boot, _claim_rng(seed, claim, 1))
            monotone = _monotone(levels, stat)
            if monotone.startswith("no"):
                extra.append(f"not monotone ({monotone[4:]}): see the per-level means")
            elif monotone != "yes":
                extra.append(f"perhaps not monotone ({monotone[10:]}): see the per-level means")
        n_unconverged: float = np.nan
        if "trace.converged" in paired.rows.columns:
            flags = [canon(v) for v in paired.rows["trace.converged"].tolist()]
            n_unconverged = float(sum(1 for f in flags if f == ("bool", False)))
            if n_unconverged:
                extra.append(f"{int(n_unconverged)} of {len(paired.rows)} job(s) had not "
                             f"converged (activation still rising over the last 10 % of steps)")
        remarks[claim.name] = "; ".join(extra)
        significant.append(excludes)
        records.append({
            "claim": claim.name, "factor": claim.factor, "metric": claim.metric,
            "direction": claim.direction, "test": paired.test, "levels": paired.levels_text,
            "unit": _unit_label(paired), "n_units": boot.n_units, "n_groups": int(len(table)),
            "n_jobs": int(table["n_jobs"].sum()), "statistic": stat,
            "ci_low": float(boot.low[0]), "ci_high": float(boot.high[0]),
            "p_value": float(boot.p[0]), "effect": effect, "effect_low": float(boot.low[1]),
            "effect_high": float(boot.high[1]), "min_effect": float(floor), "verdict": verdict,
            "p_holm": np.nan, "verdict_holm": "", "monotone": monotone,
            "n_unconverged": n_unconverged, "dropped": _dropped_text(paired), "reason": reason,
        })
    result = pd.DataFrame.from_records(records, columns=list(RESULT_COLUMNS))
    if len(result):
        adjusted = holm(result["p_value"].to_numpy(dtype=float))
        result["p_holm"] = adjusted
        for i, (claim, row) in enumerate(zip(claims, records)):
            if row["verdict"] == "no data" or row["reason"].startswith("metric constant"):
                result.at[i, "verdict_holm"] = row["verdict"]
                continue
            verdict, _ = decide(
                claim.direction, row["statistic"], row["ci_low"], row["ci_high"],
                significant=bool(adjusted[i] < 1 - CI_LEVEL), effect_low=row["effect_low"],
                effect_high=row["effect_high"], floor=row["min_effect"], n_units=row["n_units"],
                min_units=min_groups)
            result.at[i, "verdict_holm"] = verdict
    for column in ("n_units", "n_groups", "n_jobs"):
        result[column] = result[column].astype(int)
    for column in ("statistic", "ci_low", "ci_high", "p_value", "effect", "effect_low",
                   "effect_high", "min_effect", "p_holm", "n_unconverged"):
        result[column] = result[column].astype(float)
    result.attrs["notes"] = notes
    result.attrs["remarks"] = remarks
    return result


# --------------------------------------------------------------------------------------------
# A claims file on one sweep


def not_in_sweep(df: pd.DataFrame, claim: Claim) -> str | None:
    """Why ``claim`` cannot be tested on this sweep's design (None: it can)."""
    rows = filtered_rows(df, claim)
    if rows.empty:
        wanted = "; ".join(f"{c} in [{', '.join(show(canon(v)) for v in a)}]"
                           for c, a in claim.filters.items())
        return f"no job has {wanted}"
    present = sorted({c for c in (canon(v) for v in rows[claim.factor]) if c != NULL},
                     key=lambda c: (c[0], c[1]))
    shown = ", ".join(show(c) for c in present) or "none"
    if claim.levels is not None:
        absent = [v for v in claim.levels if canon(v) not in present]
        if absent:
            return (f"factor does not vary as the claim needs: {claim.factor} never is "
                    f"{' or '.join(show(canon(v)) for v in absent)} here (values: {shown})")
    elif len(present) < 2:
        return f"factor does not vary: {claim.factor} takes one value here ({shown})"
    return None


def claims_table(
    df: pd.DataFrame,
    claims: Sequence[Claim],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    min_groups: int = MIN_GROUPS,
) -> pd.DataFrame:
    """Verdicts of a claims file on a sweep: :func:`evaluate` plus ``note``.

    A claim whose factor does not vary in this sweep (after its filters), or never takes one of
    its levels, gets verdict :data:`NOT_IN_SWEEP` and the reason; the others are evaluated
    (Holm's adjustment over those). A claim with ``by`` is first split by :func:`expand_by` (one
    row per value the sweep has). Columns :data:`CLAIMS_COLUMNS`, one row per claim in order.

    Raises:
        ClaimsError: a claim names a column the table does not have (a typo: the message lists
            close names), or cannot be tested as written; raised before anything is computed.
    """
    columns = {str(c) for c in df.columns}
    typos = [c for c in claims if {c.factor, c.metric, *c.filters} - columns]
    if typos:
        validate_claims(typos, df)
        raise ClaimsError(f"claims name columns the table lacks: {[c.name for c in typos]}")
    claims = expand_by(claims, df)
    reasons: dict[str, str] = {}
    testable: list[Claim] = []
    for claim in claims:
        reason = not_in_sweep(df, claim)
        if reason is None:
            testable.append(claim)
        else:
            reasons[claim.name] = reason
    validate_claims(testable, df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluated = evaluate(df, testable, n_boot=n_boot, seed=seed, min_groups=min_groups)
    remarks = evaluated.attrs.get("remarks", {})
    by_name = {row["claim"]: row for row in evaluated.to_dict("records")}
    records = []
    for claim in claims:
        if claim.name in by_name:
            record = dict(by_name[claim.name])
            record["note"] = remarks.get(claim.name, "")
        else:
            record = _no_data_row(df, claim, NOT_IN_SWEEP, reasons[claim.name])
            record["test"] = ""
            record["note"] = ""
        records.append(record)
    out = pd.DataFrame.from_records(records, columns=list(CLAIMS_COLUMNS))
    for column in ("n_units", "n_groups", "n_jobs"):
        out[column] = out[column].astype(int)
    for column in ("statistic", "ci_low", "ci_high", "p_value", "effect", "effect_low",
                   "effect_high", "min_effect", "p_holm", "n_unconverged"):
        out[column] = out[column].astype(float)
    for column in ("monotone", "dropped", "reason", "note", "verdict_holm"):
        out[column] = out[column].fillna("").astype(str)
    return out
