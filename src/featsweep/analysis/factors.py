"""The sweep's factors as the user typed them: Hydra overrides that differ between jobs.

Also the one cell format every table and label of the report uses (:func:`fmt`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from featsweep.analysis.values import canon

__all__ = ["diversity_summary", "factor_label", "fmt", "parse_overrides", "swept_factors"]


def fmt(value: Any) -> str:
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


_SPLIT = re.compile(r"\s+(?=[+~]*[\w./@-]+=|~)")


def parse_overrides(text: Any) -> dict[str, str]:
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
    parsed = [parse_overrides(t) for t in df.get("job.overrides", pd.Series(dtype=object))]
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
        canonical = [canon(v) for v in distinct]
        if all(c[0] == "num" for c in canonical):
            distinct = [v for _, v in sorted(zip(canonical, distinct), key=lambda cv: cv[0][1])]
        out[key] = distinct
    return out


def factor_label(overrides: dict[str, str], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={overrides.get(k, '')}" for k in keys)


def diversity_summary(df: pd.DataFrame) -> list[str]:
    """Diversity groups couple their images (each is pushed away from the others), so they ran
    as one batch each: say which, with their jobs' batch sizes."""
    if "target.diversity_group" not in df:
        return []
    named = df[df["target.diversity_group"].notna() & (df["target.diversity_group"] != "")]
    if named.empty:
        return []
    parts = []
    for name, jobs in named.groupby("target.diversity_group", sort=True):
        sizes = sorted({int(b) for b in pd.to_numeric(jobs.get("result.batch_size"),
                                                       errors="coerce").dropna()})
        weight = ", ".join(sorted({fmt(w) for w in jobs.get("target.diversity", [])}))
        parts.append(f"`{name}`: {len(jobs)} job(s), weight {weight}, batch size "
                     f"{'/'.join(map(str, sizes)) or '?'}")
    return ["Diversity groups (target.diversity_group; each group's images are optimized "
            "jointly, pushed apart, and always run as one batch, so their results depend on each "
            "other by design): " + "; ".join(parts) + ".", ""]
