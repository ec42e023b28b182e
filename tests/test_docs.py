"""Documentation ships with the code: comments cite files in the repository, and those exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.glob("src/**/*.py"), *ROOT.glob("src/**/*.yaml"), ROOT / "README.md",
           *ROOT.glob("docs/*.md")]


def test_no_reference_to_files_outside_the_repository() -> None:
    outside = re.compile(r"DESIGN\.md|\.\./shared|shared/notes")
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not bad, bad


def test_cited_docs_exist() -> None:
    cited = {m for p in SOURCES for m in re.findall(r"docs/[\w./-]+\.md", p.read_text(encoding="utf-8"))}
    assert {"docs/metrics.md", "docs/claims.md", "docs/notes.md"} <= cited
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, missing


def test_metric_docs_name_every_metric_and_claim_key() -> None:
    from featsweep.analysis.claim import CLAIM_KEYS
    from featsweep.analysis.claims import RESULT_COLUMNS
    from featsweep.metrics import METRICS
    from featsweep.quality import QUALITY_COLUMNS

    metrics = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for name in (*METRICS, *QUALITY_COLUMNS, "trace.converged", "trace.gain_last10%"):
        assert f"`{name}`" in metrics, name
    claims = (ROOT / "docs" / "claims.md").read_text(encoding="utf-8")
    for key in CLAIM_KEYS:
        assert f"{key}:" in claims, key
    for column in RESULT_COLUMNS:
        assert f"`{column}`" in claims, column
