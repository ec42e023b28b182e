"""Job directories: the only code that writes (and, for resume, reads) a job's files.

Every file goes to a temporary name in the same directory and is renamed into place, so a reader
never sees half a file and a crash leaves either the old file or the new one.

Files (see docs/CONTRACTS.md): image.png, before_blur.png, image.npy, trace.csv, result.json.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from featsweep.engine import JobOutcome

RESULT = "result.json"
FILES = ("image.png", "before_blur.png", "image.npy", "trace.csv", RESULT)


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write `path` through `write(file)` into a temporary sibling, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stretch(img: np.ndarray) -> np.ndarray:
    """Min-max stretch over all pixels and channels to uint8, as the notes displayed images.

    img: (H, W, 3) float. A constant (or non-finite) image maps to mid-grey.
    """
    finite = np.where(np.isfinite(img), img, np.nan)
    lo, hi = np.nanmin(finite), np.nanmax(finite)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.full(img.shape, 128, dtype=np.uint8)
    scaled = np.nan_to_num((finite - lo) / (hi - lo), nan=0.0)
    return np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)


def _png(img_u8: np.ndarray) -> Callable[[io.BufferedWriter], None]:
    return lambda f: Image.fromarray(img_u8).save(f, format="PNG")


def write_result(job_dir: Path, result: dict[str, Any]) -> None:
    atomic_write(Path(job_dir) / RESULT,
                 lambda f: f.write((json.dumps(result, indent=2, allow_nan=False) + "\n").encode()))


def write_job(job_dir: Path, outcome: JobOutcome, extra: dict[str, Any] | None = None) -> dict:
    """Write the five files of one job into `job_dir`; result.json last (it marks completion)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(job_dir / "image.png", _png(stretch(outcome.optimized)))
    atomic_write(job_dir / "before_blur.png", _png(stretch(outcome.before_blur)))
    atomic_write(job_dir / "image.npy", lambda f: np.save(f, outcome.pixels.astype(np.float32)))

    def trace_csv(f: io.BufferedWriter) -> None:
        lines = ["step,activation"] + [f"{int(s)},{a:.9g}" for s, a in outcome.trace]
        f.write(("\n".join(lines) + "\n").encode())

    atomic_write(job_dir / "trace.csv", trace_csv)
    result = {
        "status": outcome.status,
        "activation": _finite_or_none(outcome.activation),
        "activation_start": _finite_or_none(outcome.activation_start),
        "steps": outcome.steps_done,
        "seconds": round(outcome.seconds, 4),
        "device": outcome.device,
        "diverged_at": outcome.diverged_at,
        "error": None,
        **outcome.info,
        **(extra or {}),
    }
    write_result(job_dir, result)
    return result


def write_failure(job_dir: Path, error: str, extra: dict[str, Any] | None = None) -> dict:
    """Record a job that raised: result.json with status "failed" and the error text."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    result = {"status": "failed", "activation": None, "steps": 0, "error": error, **(extra or {})}
    write_result(job_dir, result)
    return result


def read_result(job_dir: Path) -> dict[str, Any] | None:
    """result.json of a job, or None when missing or unreadable."""
    try:
        return json.loads((Path(job_dir) / RESULT).read_text())
    except (OSError, ValueError):
        return None


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and np.isfinite(x) else None
