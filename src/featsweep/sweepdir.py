"""The sweep directory (``hydra.sweep.dir``): one live sweep at a time, never a silent overwrite,
and resume that finds each job's earlier result by its config, whatever its job number.

- :class:`SweepLock`: ``.featsweep.lock`` in the sweep dir names the live sweep (host, PID, start
  time, command). A second sweep into the directory stops at once naming the holder; a lock
  whose process is gone (same host, dead PID) is stale and taken over.
- :func:`check_sweep_dir`: a sweep into a directory that already holds jobs is refused unless
  ``resume=true``; ``resume=true`` where there is nothing to resume is an error.
- :func:`arrange`: before a resumed sweep runs, each job's earlier directory (found by
  ``config_hash`` in result.json) is renamed to the job's number, so reordering the overrides
  reruns nothing; :func:`config_diff` says what changed for a job whose directory holds another
  config ("steps 800 -> 1000").
- :class:`SweepDirCallback`: a Hydra callback (``hydra.callbacks`` in conf/config.yaml) that
  applies the lock and the check to every multirun, whatever the launcher.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from featsweep.errors import UserError

log = logging.getLogger("featsweep")

LOCK = ".featsweep.lock"
_TMP = ".featsweep-move-"  # prefix of a directory being renamed by arrange()


# ------------------------------------------------------------------------------------ jobs


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Subdirectories of `sweep_dir` that hold a job (Hydra's ``.hydra/`` or a result.json),
    in natural order (2 before 10)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    found = [p for p in sweep_dir.iterdir()
             if p.is_dir() and ((p / ".hydra").is_dir() or (p / "result.json").is_file())]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit()
                                        else 0, p.name))


def _summary(dirs: Sequence[Path]) -> str:
    from featsweep.artifacts import read_result

    counts: dict[str, int] = {}
    for d in dirs:
        result = read_result(d)
        status = "no result" if result is None else str(result.get("status"))
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def check_sweep_dir(sweep_dir: Path, resume: bool) -> None:
    """Refuse a new sweep into a directory holding jobs, and a resume with nothing to resume."""
    sweep_dir = Path(sweep_dir).resolve()
    dirs = job_dirs(sweep_dir)
    if dirs and not resume:
        names = ", ".join(d.name for d in dirs[:8]) + (" ..." if len(dirs) > 8 else "")
        raise UserError(
            f"featsweep: hydra.sweep.dir={sweep_dir} already holds {len(dirs)} job(s) of an "
            f"earlier sweep ({names}: {_summary(dirs)}); a new sweep there would overwrite them. "
            "To continue that sweep, add resume=true (jobs whose config is unchanged are kept, "
            "the others run); to start a separate sweep, give it another directory "
            "(hydra.sweep.dir=OTHER, or leave hydra.sweep.dir unset for a new timestamped one).")
    if resume and not dirs:
        what = "does not exist" if not sweep_dir.exists() else "holds no jobs"
        raise UserError(
            f"featsweep: resume=true, but hydra.sweep.dir={sweep_dir} {what}, so there is nothing "
            "to resume. Give the directory of the sweep to continue (hydra.sweep.dir=PATH, as "
            "printed when it stopped), or drop resume=true to start a new sweep.")


# ------------------------------------------------------------------------------------ lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class SweepLock:
    """``.featsweep.lock`` in a sweep dir: held by one live sweep (see the module docstring).

    Created with O_EXCL, so two sweeps starting at the same moment cannot both win; a stale lock
    is replaced by an atomic rename, and released (deleted) only by its holder.
    """

    def __init__(self, sweep_dir: Path) -> None:
        self.path = Path(sweep_dir).resolve() / LOCK
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv)}
        self.held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _stale(self, holder: Mapping[str, Any]) -> bool:
        if holder.get("host") != self.record["host"]:
            return False  # another machine's PID cannot be checked from here
        pid = holder.get("pid")
        return not isinstance(pid, int) or not _pid_alive(pid) or pid == os.getpid()

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the live holder."""
        from featsweep.artifacts import atomic_write, fsync_dir

        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = (json.dumps(self.record) + "\n").encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or garbage from a crash
                    holder = {}
                if holder and not self._stale(holder):
                    raise UserError(
                        f"featsweep: another sweep is running in {self.path.parent}: started "
                        f"{holder.get('started')} on {holder.get('host')} as PID "
                        f"{holder.get('pid')} ({holder.get('command', '?')}). Two sweeps in one "
                        "directory would write the same jobs: wait for it to end (or stop it), "
                        f"or use another hydra.sweep.dir. If that sweep is dead, delete {self.path}.")
                log.warning("taking over a stale sweep lock %s (%s)", self.path,
                            f"PID {holder.get('pid')} on {holder.get('host')} is gone"
                            if holder else "unreadable")
                atomic_write(self.path, lambda f: f.write(text))
                if self._read() == self.record:
                    break
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self.path.parent)
            break
        else:  # pragma: no cover - another process kept replacing the lock
            raise UserError(f"featsweep: could not take the sweep lock {self.path}")
        self.held = True
        atexit.register(self.release)

    def release(self) -> None:
        """Delete the lock if this process still holds it."""
        if self.held and self._read() == self.record:
            self.path.unlink(missing_ok=True)
        self.held = False


# ------------------------------------------------------------------------------- resume


def arrange(sweep_dir: Path, wanted: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Rename earlier job directories so that each job finds its own result under its number.

    wanted: (directory name, config_hash) of every job of the sweep about to run. A directory
    whose result.json has a wanted hash is moved to that job's name (a job already in place is
    not touched); a directory displaced by a move goes to a name a move freed. Files inside are
    never touched (same mtimes). Two-phase renames through temporary names: a crash in between
    leaves whole directories under temporary names, which the next resume finds by hash again.
    Returns {old name: new name} of the moves.
    """
    from featsweep.artifacts import fsync_dir, read_result

    sweep_dir = Path(sweep_dir)
    by_hash: dict[str, list[Path]] = {}
    for d in job_dirs(sweep_dir):
        result = read_result(d)
        digest = result.get("config_hash") if result else None
        if isinstance(digest, str):
            by_hash.setdefault(digest, []).append(d)
    moves: dict[Path, str] = {}  # source directory -> name it must get
    later = []
    for name, digest in wanted:  # first the jobs already in place: never moved
        here = sweep_dir / name
        if here in by_hash.get(digest, []):
            by_hash[digest].remove(here)
        else:
            later.append((name, digest))
    for name, digest in later:  # a config listed twice is matched once
        if by_hash.get(digest):
            moves[by_hash[digest].pop(0)] = name
    if not moves:
        return {}
    # A directory in the way of a move (an unmatched, older job) goes to a name a move frees,
    # else to the next unused number: it is kept, never overwritten.
    dests = set(moves.values())
    freed = [src.name for src in moves if src.name not in dests and not src.name.startswith(_TMP)]
    numbers = [int(d.name) for d in job_dirs(sweep_dir) if d.name.isdigit()]
    numbers += [int(n) for n in dests if n.isdigit()]
    next_free = max(numbers, default=-1) + 1
    for dest in sorted(dests):
        blocker = sweep_dir / dest
        if blocker.exists() and blocker not in moves:
            if freed:
                moves[blocker] = freed.pop(0)
            else:
                moves[blocker] = str(next_free)
                next_free += 1
    staged = []
    for src, dest in moves.items():  # phase 1: out of the way, under temporary names
        tmp = sweep_dir / f"{_TMP}{dest}"
        if src != tmp:
            os.replace(src, tmp)
        staged.append((src.name, tmp, dest))
    for _, tmp, dest in staged:  # phase 2: into place
        os.replace(tmp, sweep_dir / dest)
    fsync_dir(sweep_dir)
    return {old: dest for old, _, dest in staged}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """What changed between two task configs, e.g. "steps 800 -> 1000, optimizer.lr 0.1 -> 0.05"."""
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b))
    parts = [f"{k} {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in keys
             if a.get(k, ...) != b.get(k, ...)]
    more = f", and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def old_config(job: Path) -> dict[str, Any] | None:
    """The task config Hydra saved for an earlier run of `job` (.hydra/config.yaml), or None."""
    from omegaconf import OmegaConf

    path = Path(job) / ".hydra" / "config.yaml"
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return None
    return cfg if isinstance(cfg, dict) else None


# ------------------------------------------------------------------------------ callback

try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _Callback = object  # type: ignore[assignment,misc]


class SweepDirCallback(_Callback):  # type: ignore[misc,valid-type]
    """Hydra callback: lock the sweep dir and check it before any job of a multirun starts.

    Hydra turns an exception raised by a callback into a warning and goes on, so a refusal is
    printed here (one paragraph on stderr) and ends the process with exit status 1.
    """

    def __init__(self) -> None:
        self.lock: SweepLock | None = None
        self.created = False

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        try:
            self._start(config)
        except UserError as exc:
            sys.stderr.write(str(exc) + "\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    def _start(self, config: Any) -> None:
        from featsweep.jobs import resume_requested

        sweep_dir = Path(str(config.hydra.sweep.dir))
        resume = resume_requested(config)
        if not sweep_dir.exists():  # nothing to lock yet: say so before creating it
            check_sweep_dir(sweep_dir, resume)
            self.created = True
        self.lock = SweepLock(sweep_dir)
        self.lock.acquire()  # a live holder is named before anything else is said
        try:
            check_sweep_dir(sweep_dir, resume)
        except BaseException:
            self.lock.release()
            raise

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.created and _dry_run(config):  # a dry run leaves no directory behind
            sweep_dir = Path(str(config.hydra.sweep.dir))
            (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
            try:
                sweep_dir.rmdir()
            except OSError:
                pass


def _dry_run(config: Any) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.select(config, "hydra.launcher.dry_run", default=False) is True
