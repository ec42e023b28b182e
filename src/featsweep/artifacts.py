"""Job directories: the only code that writes (and, for resume, reads) a job's files.

Every file goes to a temporary name in the same directory and is renamed into place, so a reader
never sees half a file and a crash leaves either the old file or the new one; the file and then
its directory are fsync'ed (a job's directory once, with result.json), so a finished job also
survives a power cut. result.json is
written last: its presence marks a finished job (Hydra's own ``.hydra/*.yaml`` are Hydra's and
are written by Hydra, not through here).

Files (see docs/CONTRACTS.md): image.png, before_blur.png, image.npy, trace.csv, result.json;
state.pt beside an interrupted job (what resume continues from).

Resume (``resume=true``) reads result.json back: :func:`completed` says whether a job directory
already holds an ``ok`` result for the same config (:func:`config_hash`) with all its files.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

if TYPE_CHECKING:  # torch is imported only when a job is really written
    from featsweep.engine import JobOutcome

RESULT = "result.json"
FILES = ("image.png", "before_blur.png", "image.npy", "trace.csv", RESULT)
STATE = "state.pt"  # an interrupted job's optimizer state (engine's JobOutcome.state)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the usual permissions (0666 & ~umask; mkstemp alone would leave them 0600).
_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory: nothing more to do there
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None], *,
                 sync_dir: bool = True) -> None:
    """Write `path` through `write(file)` into a temporary sibling, fsync it, rename it into place,
    then fsync the directory (the rename itself is durable only once the directory is).
    ``sync_dir=False`` leaves the directory to a later write's fsync (one fsync of a directory
    makes all its renames so far durable): for files written before the one that marks them
    complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def stretch(img: np.ndarray) -> np.ndarray:
    """Min-max stretch over all pixels and channels to uint8, as the notes displayed images.

    img: (H, W, 3) float. A constant (or non-finite) image maps to mid-grey.
    """
    ok = np.isfinite(img)
    if not ok.any():  # a diverged image: nanmin would warn "All-NaN slice encountered"
        return np.full(img.shape, 128, dtype=np.uint8)
    finite = np.where(ok, img, np.nan)
    lo, hi = np.nanmin(finite), np.nanmax(finite)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.full(img.shape, 128, dtype=np.uint8)
    scaled = np.nan_to_num((finite - lo) / (hi - lo), nan=0.0)
    return np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)


def _png(img_u8: np.ndarray) -> Callable[[io.BufferedWriter], None]:
    """(H, W, C) uint8 -> PNG writer: RGB for C = 3, grayscale for C = 1 (a grayscale model's
    image), and for other C the channels side by side as one grayscale (H, W·C) strip."""
    from PIL import Image

    if img_u8.ndim == 3 and img_u8.shape[-1] == 1:
        img_u8 = img_u8[..., 0]
    elif img_u8.ndim == 3 and img_u8.shape[-1] != 3:
        img_u8 = np.concatenate(list(np.moveaxis(img_u8, -1, 0)), axis=1)
    return lambda f: Image.fromarray(np.ascontiguousarray(img_u8)).save(f, format="PNG")


def write_result(job_dir: Path, result: dict[str, Any]) -> None:
    atomic_write(Path(job_dir) / RESULT,
                 lambda f: f.write((json.dumps(result, indent=2, allow_nan=False) + "\n").encode()))


def clear_job(job_dir: Path) -> None:
    """Remove a previous run's files before a job (re)runs: result.json first, so that no old
    result ever sits beside new images or a new config (collect then reports the job as running
    or incomplete until the new result.json lands). A saved state goes too: read it first."""
    for name in reversed(FILES):  # RESULT is last in FILES: removed first
        (Path(job_dir) / name).unlink(missing_ok=True)
    (Path(job_dir) / STATE).unlink(missing_ok=True)
    for name in (*FILES, STATE):  # a process killed inside atomic_write leaves its temp file
        for tmp in Path(job_dir).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _tensors(value: Any) -> Any:
    """numpy arrays -> CPU tensors, recursively: torch.load(weights_only=True) reads tensors and
    plain Python values back, not numpy objects."""
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors(v) for v in value)
    return value


def write_state(job_dir: Path, state: Mapping[str, Any]) -> None:
    """Save an interrupted job's engine state (CPU tensors, arrays and Python scalars) as
    state.pt; arrays come back as tensors."""
    import torch

    atomic_write(Path(job_dir) / STATE, lambda f: torch.save(_tensors(dict(state)), f))


def read_state(job_dir: Path) -> dict[str, Any] | None:
    """The state saved by :func:`write_state`, or None when missing or unreadable. Read with
    ``weights_only=True``: a state file never runs code."""
    import logging

    import torch

    path = Path(job_dir) / STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated or from an incompatible torch: start from step 0
        logging.getLogger("featsweep").warning("%s is unreadable (%s); the job starts again "
                                               "from step 0", path, exc)
        return None
    return state if isinstance(state, dict) else None


def write_job(job_dir: Path, outcome: JobOutcome, extra: dict[str, Any] | None = None,
              flag: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
              state: Mapping[str, Any] | None = None,
              submit: Callable[[Callable[[], None]], Any] | None = None) -> dict:
    """Write the five files of one job into `job_dir`; result.json last (it marks completion).
    Returns result.json's content.

    `flag(result)` may add fields to result.json (an outcome that deserves a warning); `state`
    (an interrupted job's) is saved as state.pt before result.json, else any old state.pt goes.
    `submit`: the files are written by ``submit(write)`` instead of here, e.g. by a background
    writer, so that their fsyncs overlap the caller's next work; the caller waits for it (and
    sees its error) before it reports the job finished.
    """
    job_dir = Path(job_dir)
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
    result.update({"flag": None, "flag_message": None})
    if flag is not None:
        result.update(flag(result) or {})

    def trace_csv(f: io.BufferedWriter) -> None:
        lines = ["step,activation"] + [f"{int(s)},{a:.9g}" for s, a in outcome.trace]
        f.write(("\n".join(lines) + "\n").encode())

    def write() -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / RESULT).unlink(missing_ok=True)  # an old result never describes the new files
        # The directory is fsync'ed once, by result.json's write: it makes these renames durable.
        atomic_write(job_dir / "image.png", _png(stretch(outcome.optimized)), sync_dir=False)
        atomic_write(job_dir / "before_blur.png", _png(stretch(outcome.before_blur)),
                     sync_dir=False)
        atomic_write(job_dir / "image.npy", lambda f: np.save(f, outcome.pixels.astype(np.float32)),
                     sync_dir=False)
        atomic_write(job_dir / "trace.csv", trace_csv, sync_dir=False)
        if state is not None:
            write_state(job_dir, state)
        else:
            (job_dir / STATE).unlink(missing_ok=True)
        write_result(job_dir, result)

    if submit is None:
        write()
    else:
        submit(write)
    return result


def write_failure(job_dir: Path, error: str, extra: dict[str, Any] | None = None,
                  status: str = "failed") -> dict:
    """Record a job that raised (status "failed") or was refused before it started
    ("not_started"): result.json with the status and the error text, and no other file."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    clear_job(job_dir)  # a previous run's images must not be analysed as this failure's
    result = {"status": status, "activation": None, "steps": 0, "seconds": None, "device": None,
              "error": error, **(extra or {})}
    write_result(job_dir, result)
    return result


def read_result(job_dir: Path) -> dict[str, Any] | None:
    """result.json of a job, or None when missing or unreadable."""
    try:
        result = json.loads((Path(job_dir) / RESULT).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


# ------------------------------------------------------------------------------------ resume


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable fingerprint of one job's settings: sha256 (hex) of its config as canonical JSON.

    `config` is the job's config as plain containers (``OmegaConf.to_container(cfg,
    resolve=True)``); the ``hydra`` node (paths, job number, launcher) and the top-level
    ``resume`` flag are left out, so re-running the same sweep with ``resume=true`` gives the
    same hash, and any changed value (steps, lr, seed, ...) a different one.
    """
    body = {k: v for k, v in config.items() if k not in ("hydra", "resume", "resume_any_version")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def completed(job_dir: Path, digest: str) -> dict[str, Any] | None:
    """The job's result when `job_dir` already holds a finished, ok run of the config `digest`.

    None (the job must run) when result.json is missing or unreadable, its status is not ``ok``
    (failed, diverged, interrupted), it was written for another config (or before config hashes
    existed), or one of the job's files is missing. Reads only; touches nothing.
    """
    job_dir = Path(job_dir)
    result = read_result(job_dir)
    if result is None or result.get("status") != "ok" or result.get("config_hash") != digest:
        return None
    if not all((job_dir / name).is_file() for name in FILES):
        return None
    return result


# ------------------------------------------------------------------------------- provenance


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the git checkout featsweep runs from (an editable install), else None.

    Asked once per process. A featsweep installed into site-packages has no checkout of its own:
    a repository that merely contains site-packages (a venv inside a project) is not reported.
    """
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        top, commit = out.split()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    own = Path(top) / "src" / "featsweep"
    return commit if own.is_dir() and own.resolve() == src else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _host_record() -> dict[str, Any]:
    import torch

    from featsweep import __version__

    return {
        "featsweep_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "cpu_name": _cpu_name(),
    }


def provenance(device: str | None = None) -> dict[str, Any]:
    """Where and with what a job ran: featsweep version and git commit (None outside a
    checkout), torch and CUDA versions, Python, hostname, CPU, and `device_name` (the GPU's name
    for a ``cuda:N (NAME)`` device string, else the CPU's). Cheap after the first call."""
    record = dict(_host_record())
    name = record["cpu_name"]
    if device and device.startswith("cuda") and "(" in device:
        name = device[device.index("(") + 1:].rstrip(")")
    record["device_name"] = name
    return record


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and np.isfinite(x) else None
