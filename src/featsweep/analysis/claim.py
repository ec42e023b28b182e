"""The claim: a sentence about a hyperparameter as a typed value, and the claims file it comes from.

A :class:`Claim` names a factor (a config leaf such as ``optimizer.weight_decay``), a metric (an
outcome column such as ``display.brightness``), the direction the sentence asserts, the unit it
generalizes over (``target.channel`` unless it says otherwise) and an optional effect-size floor.
:func:`load_claims` reads the YAML form (docs/claims.md); :func:`claim_problems` /
:func:`validate_claims` check claims against an analysis table before anything is computed.
How claims become verdicts: :mod:`.pairing` (jobs -> paired groups) and :mod:`.stats`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import yaml

from featsweep.analysis.columns import config_columns, is_config_column
from featsweep.analysis.values import NULL, canon, show
from featsweep.errors import UserError

__all__ = [
    "CLAIM_KEYS", "DEFAULT_UNIT", "DIRECTIONS", "FILE_KEYS", "REQUIRED_KEYS", "Claim",
    "ClaimsError", "claim_problems", "expand_by", "filtered_rows", "load_claims",
    "notes_claims_path", "validate_claims",
]

Scalar = Union[str, bool, int, float]

DIRECTIONS: tuple[str, ...] = ("increase", "decrease", "any")
CLAIM_KEYS: tuple[str, ...] = ("name", "factor", "metric", "direction", "levels", "filters",
                               "ignore", "unit", "min_effect", "by")
# Top-level keys of a claims file: the claims, and a ``by`` every claim inherits unless it sets its own.
FILE_KEYS: tuple[str, ...] = ("claims", "by")
REQUIRED_KEYS: tuple[str, ...] = ("name", "factor", "metric", "direction")
# What a claim generalizes over unless it names another unit: the notes' sentences are about
# channels in general, so channels (not seeds of one channel) are the independent draws.
DEFAULT_UNIT = "target.channel"


class ClaimsError(UserError, ValueError):
    """A claims file or claim is malformed, or does not fit the analysis table."""


def notes_claims_path() -> Path:
    """Path of the claims file shipped with featsweep: the by-eye judgements of the notes."""
    return Path(str(resources.files("featsweep") / "claims" / "notes.yaml"))


def _canon_series(series: pd.Series) -> pd.Series:
    return pd.Series([canon(v) for v in series.tolist()], index=series.index, dtype=object)


@dataclass(frozen=True)
class Claim:
    """One testable sentence.

    Attributes:
        name: the sentence itself, e.g. "Higher weight decay gives darker images".
        factor: config column varied (``optimizer.weight_decay``).
        metric: outcome column measured (``display.brightness``, ``activation``, ...).
        direction: ``increase`` / ``decrease`` (the metric rises / falls as the factor rises, or
            from level A to level B), or ``any`` (a two-sided question: does it change at all?).
        levels: optional ``(A, B)``; the statistic is then metric(B) − metric(A) and only jobs at
            these two factor values are used.
        filters: column → tuple of allowed values; rows outside are dropped before pairing.
        ignore: config columns not held equal when pairing (settings that only exist for some
            factor values, e.g. ``optimizer.momentum`` when comparing SGD with Adam).
        unit: the config column the claim generalizes over (default ``target.channel``): the
            bootstrap resamples units, then paired groups within a unit, and the minimum count
            applies to units. ``None``: every paired group is its own unit.
        min_effect: effect-size floor in the metric's units (≥ 0); an effect whose CI lies wholly
            inside ±floor is ``negligible``. ``None``: taken from the data (the seed-to-seed
            spread of the metric at fixed settings, see :mod:`.stats`); 0 disables the floor.
        by: config columns the verdict is given separately for (e.g. ``param.kind``: one verdict
            per parameterization). :func:`expand_by` turns the claim into one claim per value the
            sweep has, named ``"<name> [param.kind=fft]"``; a sweep with one value keeps it whole.
    """

    name: str
    factor: str
    metric: str
    direction: str
    levels: tuple[Scalar, Scalar] | None = None
    filters: dict[str, tuple[Scalar | None, ...]] = field(default_factory=dict, hash=False)
    ignore: tuple[str, ...] = ()
    unit: str | None = DEFAULT_UNIT
    min_effect: float | None = None
    by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked here, not only in load_claims, so claims built in code obey the same rules.
        who = f"claim {self.name!r}" if isinstance(self.name, str) else "claim"
        if not isinstance(self.name, str) or not self.name.strip():
            _bad(who, "name", self.name, "a non-empty sentence (string)")
        if not isinstance(self.factor, str) or not self.factor:
            _bad(who, "factor", self.factor, "a config column name such as 'optimizer.weight_decay'")
        if not is_config_column(self.factor):
            _bad(who, "factor", self.factor,
                 "a config leaf, not an outcome or bookkeeping column (e.g. 'optimizer.weight_decay')")
        if not isinstance(self.metric, str) or not self.metric:
            _bad(who, "metric", self.metric, "an outcome column name such as 'display.brightness'")
        if is_config_column(self.metric):
            _bad(who, "metric", self.metric,
                 "an outcome column: 'activation', or one starting with display., raw., trace. "
                 "or result.")
        if self.direction not in DIRECTIONS:
            _bad(who, "direction", self.direction, _alternatives(DIRECTIONS))
        if self.levels is not None:
            levels = self.levels
            if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) != 2:
                _bad(who, "levels", levels, "a list of two factor values [A, B] (statistic B − A)")
            for level in levels:
                if not _is_scalar(level):
                    _bad(who, "levels", list(levels), "two scalars (string, number or true/false)")
            if canon(levels[0]) == canon(levels[1]):
                _bad(who, "levels", list(levels), "two different factor values")
            object.__setattr__(self, "levels", (levels[0], levels[1]))
        if not isinstance(self.filters, Mapping):
            _bad(who, "filters", self.filters, "a mapping column → value or list of allowed values")
        filters: dict[str, tuple[Scalar | None, ...]] = {}
        for column, allowed in self.filters.items():
            if not isinstance(column, str) or not column:
                _bad(who, "filters", column, "column names (strings) as keys")
            values = tuple(allowed) if isinstance(allowed, (list, tuple)) else (allowed,)
            if not values:
                _bad(who, f"filters.{column}", list(values), "a value or a non-empty list of values")
            for value in values:
                if value is not None and not _is_scalar(value):
                    _bad(who, f"filters.{column}", allowed,
                         "a scalar (string, number, true/false, null) or a list of scalars")
            filters[column] = values
        object.__setattr__(self, "filters", filters)
        ignore = (self.ignore,) if isinstance(self.ignore, str) else self.ignore
        if not isinstance(ignore, Iterable) or not all(isinstance(c, str) and c for c in ignore):
            _bad(who, "ignore", self.ignore, "a list of config column names")
        ignore = tuple(ignore)
        if self.factor in ignore:
            _bad(who, "ignore", list(ignore), "config columns other than the factor itself")
        object.__setattr__(self, "ignore", ignore)
        if self.unit is not None:
            if not isinstance(self.unit, str) or not self.unit or not is_config_column(self.unit):
                _bad(who, "unit", self.unit,
                     "a config column the claim generalizes over (e.g. 'target.channel'), or null "
                     "for 'each paired group is a unit'")
            if self.unit == self.factor or self.unit in ignore:
                _bad(who, "unit", self.unit,
                     "a config column other than the factor and the ignored columns (the unit "
                     "is held equal within a paired group)")
        if self.min_effect is not None:
            ok = isinstance(self.min_effect, (int, float)) and not isinstance(self.min_effect, bool)
            if not ok or not math.isfinite(float(self.min_effect)) or float(self.min_effect) < 0:
                _bad(who, "min_effect", self.min_effect,
                     "a number ≥ 0 in the metric's units (0: no floor), or null for the seed-to-seed "
                     "spread of the data")
            object.__setattr__(self, "min_effect", float(self.min_effect))
        by = (self.by,) if isinstance(self.by, str) else self.by
        if not isinstance(by, Iterable) or not all(isinstance(c, str) and c for c in by):
            _bad(who, "by", self.by, "a list of config column names (e.g. [param.kind])")
        by = tuple(by)
        for column in by:
            if not is_config_column(column) or column in (self.factor, self.unit, *ignore):
                _bad(who, "by", list(by),
                     "config columns other than the factor, the unit and the ignored columns "
                     "(one verdict per value of each)")
        object.__setattr__(self, "by", by)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float)) and not (
        isinstance(value, float) and math.isnan(value)
    )


def _alternatives(allowed: Sequence[str]) -> str:
    quoted = [repr(a) for a in allowed]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _bad(who: str, key: str, value: Any, allowed: str) -> None:
    raise ClaimsError(f"{who}: key '{key}' is {value!r}; allowed: {allowed}.")


# --------------------------------------------------------------------------------------------
# Reading and checking claims files


def load_claims(path: str | Path) -> list[Claim]:
    """Read a claims file.

    Schema::

        claims:
          - name: "Higher weight decay gives darker images"   # the sentence (unique)
            factor: optimizer.weight_decay                      # config column
            metric: display.brightness                          # outcome column
            direction: decrease                                 # increase | decrease | any
            levels: [A, B]                # optional: statistic = metric(B) − metric(A)
            filters: {regularizer.clamp: true, blur.k: [1, 3]}  # optional: value or list
            ignore: [optimizer.momentum]  # optional: config columns not held equal
            unit: target.channel          # optional: what the claim generalizes over (default)
            min_effect: 0.01              # optional: effect floor in metric units (default: data)

    Raises:
        ClaimsError: naming the file, the claim, the key, the bad value and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ClaimsError(f"claims file {str(path)!r} does not exist or is not a file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ClaimsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict) or "claims" not in data:
        raise ClaimsError(
            f"{path}: the file must be a mapping with one key 'claims' holding a list of claims, "
            f"got {type(data).__name__}{' with keys ' + repr(sorted(map(str, data))) if isinstance(data, dict) else ''}."
        )
    extra = sorted(str(k) for k in data if k not in FILE_KEYS)
    if extra:
        raise ClaimsError(f"{path}: unknown top-level key(s) {extra}; allowed: "
                          f"{_alternatives(FILE_KEYS)}.")
    file_by = data.get("by") or ()
    items = data["claims"]
    if not isinstance(items, list):
        raise ClaimsError(f"{path}: key 'claims' is {items!r}; allowed: a list of claims.")
    claims: list[Claim] = []
    seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        where = f"{path}: claim {number}"
        if not isinstance(item, dict):
            raise ClaimsError(
                f"{where} is {item!r}; allowed: a mapping with keys {_alternatives(REQUIRED_KEYS)} "
                f"(and optionally levels, filters, ignore, unit, min_effect)."
            )
        name = item.get("name")
        if isinstance(name, str):
            where += f" ({name!r})"
        for key in item:
            if key not in CLAIM_KEYS:
                close = difflib.get_close_matches(str(key), CLAIM_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ClaimsError(
                    f"{where}: unknown key {key!r}{hint}; allowed: {_alternatives(CLAIM_KEYS)}."
                )
        missing = [k for k in REQUIRED_KEYS if k not in item]
        if missing:
            raise ClaimsError(
                f"{where}: missing key(s) {', '.join(repr(m) for m in missing)}; every claim needs "
                f"{_alternatives(REQUIRED_KEYS)}."
            )
        try:
            claim = Claim(
                name=item["name"], factor=item["factor"], metric=item["metric"],
                direction=item["direction"], levels=item.get("levels"),
                filters=item.get("filters") or {}, ignore=item.get("ignore") or (),
                unit=item.get("unit", DEFAULT_UNIT), min_effect=item.get("min_effect"),
                by=item["by"] if "by" in item else _inherited_by(file_by, item),
            )
        except ClaimsError as exc:
            # The dataclass names the claim; say where in the file it is, too.
            message = str(exc)
            message = message.split(": ", 1)[1] if message.startswith("claim") else message
            raise ClaimsError(f"{where}: {message}") from None
        if claim.name in seen:
            raise ClaimsError(
                f"{where}: key 'name' is {claim.name!r}, already used by claim {seen[claim.name]}; "
                f"allowed: a name not used by another claim (results are keyed by it)."
            )
        seen[claim.name] = number
        claims.append(claim)
    return claims


def _inherited_by(file_by: Any, item: Mapping[str, Any]) -> Any:
    # The file's ``by`` applies where it can: a claim that varies, ignores or generalizes over
    # one of its columns keeps the others (say ``by: []`` in a claim to opt out entirely).
    if isinstance(file_by, str):
        file_by = [file_by]
    if not isinstance(file_by, (list, tuple)):
        return file_by  # the Claim check names the bad value
    own = {item.get("factor"), item.get("unit", DEFAULT_UNIT), *(item.get("ignore") or ())}
    return [c for c in file_by if c not in own]


def expand_by(claims: Sequence[Claim], df: pd.DataFrame) -> list[Claim]:
    """Each claim with ``by`` as one claim per combination of its ``by`` values in ``df``.

    The rows a claim can use (its filters applied) decide the combinations; each becomes a claim
    named ``"<name> [column=value, ...]"`` with the values added to its filters and ``by``
    emptied, so it is tested on its own rows only (Holm's family then holds every part). A claim
    whose rows have one combination, or whose ``by`` columns the table lacks, stays as it is.
    Idempotent: claims without ``by`` pass through.
    """
    out: list[Claim] = []
    for claim in claims:
        columns = [c for c in claim.by if c in df.columns]
        if not columns:
            out.append(replace(claim, by=()))
            continue
        # A filter column the table lacks is claims_table's error to report; split on the rest.
        present = {c: v for c, v in claim.filters.items() if c in df.columns}
        rows = filtered_rows(df, replace(claim, filters=present))
        combos = sorted({tuple(canon(v) for v in values)
                         for values in zip(*(rows[c].tolist() for c in columns))})
        if len(combos) < 2:
            out.append(replace(claim, by=()))
            continue
        for combo in combos:
            label = ", ".join(f"{c}={show(v)}" for c, v in zip(columns, combo))
            filters = dict(claim.filters)
            filters.update({c: (_plain(v),) for c, v in zip(columns, combo)})
            out.append(replace(claim, name=f"{claim.name} [{label}]", filters=filters, by=()))
    return out


def filtered_rows(df: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """The rows of `df` that pass `claim`'s filters (every filter column must be in `df`)."""
    rows = df
    for column, allowed in claim.filters.items():
        wanted = {canon(v) for v in allowed}
        rows = rows[np.array([canon(v) in wanted for v in rows[column].tolist()], dtype=bool)]
    return rows


def _plain(value: tuple) -> Any:
    # canon() form back to the scalar a filter holds: ("str", "fft") -> "fft", ("none",) -> None.
    return None if value == NULL else value[1]


def claim_problems(claims: Sequence[Claim], df: pd.DataFrame) -> list[str]:
    """Everything in ``claims`` that does not fit the table ``df`` (empty list: all fit).

    Checks that the factor is a config column of the table, that the metric and every filter
    column exist, that levels and filter values occur in their columns, and that a non-numeric
    factor without levels has exactly two values. Close column names are suggested.
    """
    problems: list[str] = []
    columns = [str(c) for c in df.columns]
    configs = config_columns(df)

    def missing(who: str, key: str, column: str, pool: list[str]) -> str:
        close = difflib.get_close_matches(column, pool, n=3, cutoff=0.6)
        hint = f"; did you mean {_alternatives(close)}?" if close else ""
        return f"claim {who!r}: {key} column {column!r} is not in the analysis table{hint}"

    def values_of(column: str) -> list[tuple]:
        return sorted({c for c in _canon_series(df[column]) if c != ("none",)})

    for claim in claims:
        if claim.factor not in columns:
            problems.append(missing(claim.name, "factor", claim.factor, configs))
        if claim.metric not in columns:
            outcomes = [c for c in columns if not is_config_column(c)]
            problems.append(missing(claim.name, "metric", claim.metric, outcomes))
        for column, allowed in claim.filters.items():
            if column not in columns:
                problems.append(missing(claim.name, "filter", column, columns))
                continue
            present = values_of(column)
            absent = [v for v in allowed if canon(v) not in present and canon(v) != ("none",)]
            if absent:
                problems.append(
                    f"claim {claim.name!r}: filter {column} allows {absent!r}, which the table never "
                    f"has; its values are {', '.join(show(v) for v in present) or 'none'}"
                )
        if claim.unit is not None and claim.unit != DEFAULT_UNIT and claim.unit not in columns:
            problems.append(missing(claim.name, "unit", claim.unit, configs))
        if claim.factor not in columns:
            continue
        present = values_of(claim.factor)
        if claim.levels is not None:
            absent = [v for v in claim.levels if canon(v) not in present]
            if absent:
                problems.append(
                    f"claim {claim.name!r}: level(s) {absent!r} of factor {claim.factor} never occur "
                    f"in the table; its values are {', '.join(show(v) for v in present) or 'none'}"
                )
        else:
            kinds = {v[0] for v in present}
            if kinds and kinds not in ({"num"}, {"bool"}) and len(present) != 2:
                problems.append(
                    f"claim {claim.name!r}: factor {claim.factor} is not numeric and has "
                    f"{len(present)} values ({', '.join(show(v) for v in present)}); give "
                    f"'levels: [A, B]' to compare two of them"
                )
    return problems


def validate_claims(claims: Sequence[Claim], df: pd.DataFrame) -> None:
    """Raise :class:`ClaimsError` listing every problem of :func:`claim_problems`, if any.

    Meant to run before :func:`evaluate` on a user's claims file, so a typo fails loudly
    instead of quietly becoming "no data".
    """
    problems = claim_problems(claims, df)
    if problems:
        raise ClaimsError(
            "the claims do not fit the analysis table:\n" + "\n".join(f"- {p}" for p in problems)
        )
