"""Progress of long jobs (training, sampling, the probe, whole-slide segmentation): a tqdm bar on a
terminal, plain lines in a log.

A carriage-return progress bar written to a file (``nohup``, a batch scheduler, ``2> log``) becomes
one enormous line. So when the stream is not a terminal, :func:`progress_bar` returns a
:class:`LineProgress` instead, which prints one ordinary line at most every ``interval`` seconds
(default 30; environment variable ``DIFFUSIONDCI_PROGRESS_SECONDS``) and one when the job ends::

    seg1: 1200/50000 steps (2.4%) loss=0.0432 lr=1.00e-04, 3.21 steps/s, ETA 4h13m

Both kinds offer what the stages use of tqdm: ``update``, ``set_postfix``, ``n``/``total``,
``refresh``, ``close`` and use as a context manager.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["LineProgress", "format_duration", "progress_bar"]

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "DIFFUSIONDCI_PROGRESS_SECONDS"


def format_duration(seconds: float) -> str:
    """``3h05m``, ``4m10s``, ``12s``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LineProgress:
    """Progress as plain lines (no carriage returns): ``desc: n/total units (p%) postfix, rate, ETA``,
    at most every ``interval`` seconds, and a last one at the end (or at ``close`` if it stopped
    early) unless the job was short (under ``QUIET_S`` seconds with no line printed before)."""

    QUIET_S = 5.0

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
                 stream: TextIO | None = None, interval: float | None = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self.initial = int(initial)
        self.stream = stream
        self.interval = _interval() if interval is None else float(interval)
        self.postfix: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._last_time = self._t0
        self._last_n: int | None = None
        self._closed = False

    @property
    def units(self) -> str:
        return self.unit if self.unit.endswith("s") else f"{self.unit}s"

    def line(self) -> str:
        """The current progress as one line."""
        elapsed = time.monotonic() - self._t0
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            text = f"{head}{self.n}/{self.total} {self.units} ({100.0 * self.n / self.total:.1f}%)"
        else:
            text = f"{head}{self.n} {self.units}"
        if self.postfix:
            text += " " + " ".join(f"{k}={v}" if k else str(v) for k, v in self.postfix.items())
        if done > 0:
            text += f", {rate:.3g} {self.units}/s" if rate >= 1 or rate == 0 else f", {1 / rate:.3g} s/{self.unit}"
            if self.total and self.n < self.total and rate > 0:
                text += f", ETA {format_duration((self.total - self.n) / rate)}"
            elif self.total and self.n >= self.total:
                text += f", took {format_duration(elapsed)}"
        return text

    def _emit(self) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(), file=stream, flush=True)
        self._last_time = time.monotonic()
        self._last_n = self.n

    def _worth_a_last_line(self) -> bool:
        return self._last_n is not None or time.monotonic() - self._t0 >= min(self.QUIET_S, self.interval)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        finished = bool(self.total) and self.n >= self.total
        due = time.monotonic() - self._last_time >= self.interval
        if self._last_n != self.n and (due or (finished and self._worth_a_last_line())):
            self._emit()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kw}

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = {"": s} if s else {}

    def refresh(self) -> None:
        """Nothing to redraw; a line is printed by :meth:`update` when it is due."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._last_n != self.n and self.n != self.initial and self._worth_a_last_line():
                self._emit()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str = "", unit: str = "it", *, enabled: bool = True, initial: int = 0,
                 stream: TextIO | None = None, interval: float | None = None, **tqdm_kw: Any) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress`;
    a silent tqdm when not ``enabled``. ``tqdm_kw`` go to tqdm (e.g. ``leave``)."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    target = stream if stream is not None else sys.stderr
    if _is_terminal(target):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=target, dynamic_ncols=True, **tqdm_kw)
    return LineProgress(total, desc, unit, initial=initial, stream=stream, interval=interval)
