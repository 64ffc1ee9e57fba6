"""The run directory: an exclusive lock, the saved config, and metrics that no kill or full disk can cut.

Layout of ``RUN/``::

    .lock              held (flock) by the one training process; names its pid, host and start time
    config.json        the resolved config of the run (written atomically at start)
    checkpoints/       step_XXXXXXXX/ directories (adaln.engine.checkpoint)
    metrics.jsonl      one JSON row per logged step: step, loss, lr, grad_norm, examples_per_s
    metrics.csv        the same rows as CSV, rewritten atomically at every checkpoint and at exit
    loss.png           the loss curve, likewise

The lock is an ``fcntl.flock`` on ``.lock``: the kernel releases it when the holder exits or dies, so a
stale lock from a killed process never blocks (there is nothing to clean up), and a live holder makes a
second trainer refuse at once. Each metrics row is appended with one ``write`` call; a row cut by a full
disk is truncated away at once, and on opening, unreadable rows and rows past the resumed step are
dropped, so a resumed run's metrics have no duplicate or backward steps.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adaln.engine.checkpoint import CHECKPOINTS_DIR
from adaln.errors import ConfigError, RunError
from adaln.outputs import TEMP_PREFIX, plot_loss_curve, write_json, write_text

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
LOSS_PLOT = "loss.png"
METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "examples_per_s")


def run_path(out: object, flag: str = "--out") -> Path:
    """``out`` as a run directory path: a non-empty path that is not an existing file."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ConfigError(f"{flag} must name a run directory, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a run directory")
    return path


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's exclusive lock; ``RunError`` naming the holder when another process has it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
            raise RunError(f"{run_dir} is in use by another training process ({holder}): wait for it to "
                           "finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove temporary and trash directories/files that a killed process left (call with the lock held)."""
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith((TEMP_PREFIX, ".trash-")):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    return removed


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_json(run_dir / CONFIG_FILE, config)


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The saved config of a run, None when the directory has none; RunError naming a garbled file."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}): the run's saved config is damaged") from None
    if not isinstance(data, dict) or not data.get("task"):
        raise RunError(f"{path} holds no task config (a mapping with 'task'): the run's saved config is damaged")
    return data


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete, readable rows of a metrics file (cut or garbled lines skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("loss"), (int, float)):
            rows.append(row)
    return rows


class MetricsLog:
    """``metrics.jsonl`` of a run, kept to the rows of steps ``<= start`` and then appended to."""

    def __init__(self, run_dir: Path, start: int):
        self.run_dir, self.path = run_dir, run_dir / METRICS_FILE
        self.rows = [r for r in read_metrics(self.path) if r["step"] <= start]
        steps = [r["step"] for r in self.rows]
        if sorted(set(steps)) != steps:  # duplicates or backward steps: keep the last row of each step
            self.rows = list({r["step"]: r for r in self.rows}.values())
            self.rows.sort(key=lambda r: r["step"])
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row with a single write; on failure the file is cut back to its last whole row."""
        data = (json.dumps(row) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(28, "short write (disk full?)")
        except OSError as e:
            os.ftruncate(self.fd, size)
            raise RunError(f"could not append to {self.path}: {e.strerror or e}") from e
        self.rows.append(row)

    def write_derived(self) -> None:
        """Rewrite ``metrics.csv`` and ``loss.png`` from the rows (atomically)."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(METRIC_COLUMNS)
        writer.writerows([r.get(c, "") for c in METRIC_COLUMNS] for r in self.rows)
        write_text(self.run_dir / METRICS_CSV, buf.getvalue())
        plot_loss_curve(self.rows, self.run_dir / LOSS_PLOT)

    def close(self) -> None:
        os.close(self.fd)

