"""``python -m featsweep.analysis SWEEP_DIR [--claims FILE] [--out DIR]``.

Collects the sweep into a table, tests the claims (default: the notes' claims shipped with
featsweep) and writes runs.parquet, runs.csv, claims.csv, PNGs and report.md to
``SWEEP_DIR/analysis/``. ``--quality [--natural DIR]`` adds the model-based quality metrics. A user error prints one paragraph to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m featsweep.analysis",
        description="Analyse a featsweep sweep: one table row per job, image metrics, claims with "
                    "verdicts, and a markdown report with pictures.",
    )
    parser.add_argument("sweep_dir", help="the sweep directory (e.g. multirun/DATE/TIME), searched "
                                          "recursively for job directories; or a saved "
                                          "runs.parquet/runs.csv to rebuild its report")
    parser.add_argument("--claims", metavar="FILE", default=None,
                        help="claims YAML file (default: the notes' claims shipped with featsweep)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (default: SWEEP_DIR/analysis)")
    parser.add_argument("--quality", action="store_true",
                        help="also compute quality.robustness, quality.natural_ratio, "
                             "quality.seed_diversity and the dataset examples (loads each job's "
                             "model; see docs/metrics.md)")
    parser.add_argument("--natural", metavar="DIR", default=None,
                        help="folder of natural images for --quality (default: scikit-image's "
                             "bundled photographs), e.g. an ImageNet validation split")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")

    from featsweep.analysis.claims import ClaimsError
    from featsweep.analysis.report import write_report
    from featsweep.errors import UserError

    try:
        report = write_report(args.sweep_dir, claims_file=args.claims, out_dir=args.out,
                              quality=args.quality or args.natural is not None,
                              natural_dir=args.natural)
        from featsweep.analysis.html import write_html_report

        write_html_report(report.parent)  # report.html beside report.md, from the same run
    except (UserError, ClaimsError) as exc:
        message = str(exc)
        if not message.startswith("featsweep"):
            message = f"featsweep.analysis: {message}"
        print(message, file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the output directory is not writable
        print(f"featsweep.analysis: cannot write the analysis: {exc}", file=sys.stderr)
        return 2
    print(f"featsweep.analysis: wrote {report} and report.html (and tables and pictures beside "
          "them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
