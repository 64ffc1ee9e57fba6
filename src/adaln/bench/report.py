"""The GPU report's records and its clock: sections holding tables, checks and notes; time slices; report.md.

A ``Section`` is filled while it runs, so whatever it measured before an error or a spent time slice is
kept. ``Report.write`` rewrites ``report.json`` and ``report.md`` atomically (``adaln.outputs``) after
every section: a run killed from outside still leaves the sections it finished. Failed checks and section
errors are listed first in report.md and make the exit status 1.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaln.outputs import write_json, write_text

STATUSES = ("ok", "failed", "error", "timed_out", "skipped")


class SliceTimeout(BaseException):
    """Raised in the main thread when a section's time slice is spent.

    A ``BaseException``, so the ``except Exception`` of each measured item (and of library code such as
    torch.compile's) does not swallow it: the section ends there and later sections still run.
    """


@dataclass
class Deadline:
    """The end of a time slice on the monotonic clock."""

    end: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise ``SliceTimeout`` after ``seconds`` (SIGALRM; only in the main thread, elsewhere a no-op).

    The signal is handled between Python bytecodes: a call blocked inside C (a hung device
    synchronisation) ends only when it returns, which is why the report is written after every section.
    """
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not usable:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise SliceTimeout(f"time slice of {seconds:.0f} s spent")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"table {self.title!r} has {len(self.columns)} columns, got a row of {len(row)}")
        self.rows.append(list(row))


@dataclass
class Check:
    """One comparison: ``passed`` says whether every measured value is within its tolerance."""

    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    key: str
    number: int
    title: str
    status: str = "pending"
    slice_s: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def table(self, title: str, columns: list[str]) -> Table:
        t = Table(title, columns)
        self.tables.append(t)
        return t

    def check(self, name: str, passed: bool, detail: str, **values: Any) -> Check:
        c = Check(name, bool(passed), detail, values)
        self.checks.append(c)
        return c

    def error(self, what: str, trace: str) -> None:
        """An item that raised: its traceback is kept and the section (and the run) count as failed."""
        self.errors.append(f"{what}\n{trace}")

    def finish(self, status: str | None = None) -> None:
        """Final status: an explicit one (skipped, timed_out), else failed / error / ok from the records."""
        if status is None:
            status = "failed" if any(not c.passed for c in self.checks) else "error" if self.errors else "ok"
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.status = status


@dataclass
class Report:
    mode: str
    budget_s: float
    started: str
    facts: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    wall_s: float = 0.0

    def failures(self) -> list[dict[str, str]]:
        """Every failed check, then every item that raised, section by section."""
        out = [{"section": s.title, "what": c.name, "detail": c.detail} for s in self.sections for c in s.checks
               if not c.passed]
        for s in self.sections:
            out += [{"section": s.title, "what": e.split("\n", 1)[0], "detail": e.split("\n", 1)[-1]}
                    for e in s.errors]
        return out

    def exit_code(self) -> int:
        return 1 if self.failures() else 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "failures": self.failures(), "exit_code": self.exit_code()}

    def write(self, out: Path) -> None:
        write_json(out / "report.json", _finite(self.to_json()))
        write_text(out / "report.md", self.to_markdown())

    def to_markdown(self) -> str:
        f = self.facts
        lines = ["# adaln GPU report", ""]
        lines.append(f"mode **{self.mode}** · device **{f.get('device', '?')}** · torch {f.get('torch', '?')} · "
                     f"triton {f.get('triton') or 'not installed'} · CUDA {f.get('cuda') or '-'} · "
                     f"budget {self.budget_s:.0f} s · wall {self.wall_s:.1f} s · started {self.started}")
        lines.append("")
        failures = self.failures()
        lines.append(f"## Failures ({len(failures)})" if failures else "## Failures: none")
        lines.append("")
        for item in failures:
            detail = item["detail"].strip()
            block = f"\n\n```\n{detail}\n```" if "\n" in detail else f": {detail}"
            lines.append(f"- **{item['section']}** · {item['what']}{block}")
        if failures:
            lines.append("")
        for s in sorted(self.sections, key=lambda s: s.number):
            lines += _section_markdown(s)
        return "\n".join(lines).rstrip() + "\n"


def _section_markdown(s: Section) -> list[str]:
    lines = [f"## {s.title}", "", f"status **{s.status}** · {s.seconds:.1f} s of a {s.slice_s:.0f} s slice", ""]
    lines += [f"- {n}" for n in s.notes]
    if s.notes:
        lines.append("")
    if s.summary:
        lines.append(" · ".join(f"{k}: {_cell(v)}" for k, v in s.summary.items()))
        lines.append("")
    for t in s.tables:
        if not t.rows:
            continue
        lines += [f"**{t.title}**", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t.rows]
        lines.append("")
    if s.checks:
        failed = [c for c in s.checks if not c.passed]
        lines.append(f"{len(s.checks) - len(failed)} of {len(s.checks)} checks passed")
        lines.append("")
        if failed:
            lines += [f"- FAILED {c.name}: {c.detail}" for c in failed] + [""]
    return lines


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5)) else f"{v:.3f}".rstrip("0").rstrip(".")
    return "-" if v is None else str(v)


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: such floats become their string ("nan", "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
