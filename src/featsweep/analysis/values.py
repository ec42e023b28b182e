"""One spelling of a setting's value, whatever source it came from.

YAML, Hydra overrides and pandas each spell the same setting differently (``True``, ``"true"``,
``numpy.bool_``; ``1e-5``, ``"1e-05"``, ``numpy.float64``). Filters, levels, group keys and the
report's labels compare and print a canonical form so that a claims file matches a table however
the table was read.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["NULL", "canon", "show"]

NULL: tuple = ("none",)  # how a missing value reads after :func:`canon`


def canon(value: Any) -> tuple:
    """Canonical, sortable form of one cell or YAML scalar: ``(kind, value)``.

    Kinds: ``("none",)`` for None/NaN/"null"; ``("bool", b)``; ``("num", float)`` for numbers and
    numeric text; ``("str", text)`` for everything else (stripped).
    """
    if value is None:
        return NULL
    if isinstance(value, (bool, np.bool_)):
        return ("bool", bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        return NULL if math.isnan(number) else ("num", number)
    if isinstance(value, str):
        text = value.strip()
        low = text.lower()
        if low in ("true", "false"):
            return ("bool", low == "true")
        if low in ("null", "none", "nan"):
            return NULL
        try:
            return ("num", float(text))
        except ValueError:
            return ("str", text)
    return ("str", str(value))


def show(canonical: tuple) -> str:
    """Exact, readable text of a canonical value (YAML spelling; floats keep every digit)."""
    kind = canonical[0]
    if kind == "none":
        return "null"
    if kind == "bool":
        return "true" if canonical[1] else "false"
    if kind == "num":
        number = float(canonical[1])
        if number.is_integer() and abs(number) < 1e15:
            return str(int(number))
        return repr(number)
    return str(canonical[1])
