"""Column vocabulary of the analysis table (one row per job; see docs/CONTRACTS.md).

The table mixes three kinds of columns: bookkeeping (``job.*``, ``choice.*``), outcomes
(``status``, ``activation``, ``result.*``, ``trace.*``, ``display.*``, ``raw.*``,
``quality.*``) and the config
leaves that describe what was run. Claims pair jobs that share every config leaf but one, so the
config leaves must be told apart from everything else by name alone; this module is that rule.
"""

from __future__ import annotations

import pandas as pd

# Prefixes of columns that are not config leaves: bookkeeping, Hydra's group choices (they
# duplicate config leaves under another name) and every measured outcome.
RESERVED_PREFIXES: tuple[str, ...] = ("job.", "choice.", "result.", "trace.", "display.", "raw.",
                                      "quality.")

# Unprefixed outcome columns taken from result.json.
RESULT_COLUMNS: tuple[str, ...] = ("status", "activation")

# Config leaves that say how a job was run, not what was run: a resumed job has resume=true
# and must still pair with the jobs of the first run.
BOOKKEEPING_LEAVES: tuple[str, ...] = ("resume", "optimized_metric")  # + what a search optimized


def is_config_column(name: str) -> bool:
    """Whether ``name`` is a config leaf (``optimizer.lr``, ``seed``, ...) rather than an outcome."""
    return (name not in RESULT_COLUMNS and name not in BOOKKEEPING_LEAVES
            and not name.startswith(RESERVED_PREFIXES))


def config_columns(df: pd.DataFrame) -> list[str]:
    """The config-leaf columns of an analysis table, in the table's column order.

    Every column that is not ``status``/``activation``, not in :data:`BOOKKEEPING_LEAVES` and
    does not start with one of :data:`RESERVED_PREFIXES`.
    """
    return [str(c) for c in df.columns if is_config_column(str(c))]
