"""Progress that suits where it goes: a tqdm bar on a terminal, plain periodic lines in a log.

A tqdm bar redraws itself with carriage returns; on a terminal that is one line, in a Kubeflow step's log or a CI
log every redraw is kept (a 300-step distill wrote hundreds of KB of bar frames). So every long loop asks
:func:`progress` for its bar: when stderr is a terminal it gets tqdm as before; otherwise a :class:`PlainProgress`
that writes one line every ``PPCL_PROGRESS_INTERVAL`` seconds (default 30) with the count, the rate and the
ETA, e.g. ``distill: 120/300 steps (40%), 2.10 steps/s, ETA 1m26s, loss=0.1234``, and a closing line with the
total time, but only when it wrote at least one line before (a loop shorter than the interval stays silent, as
a test's captured stderr expects). ``disable=True`` (the commands' ``--no-progress``) writes nothing at all.

Both kinds take the subset of tqdm's interface ppcl uses: ``update(n)``, ``set_postfix(**kw)``, ``close()``,
iteration over ``iterable``, use as a context manager, and ``.n`` / ``.total``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

#: Seconds between two plain progress lines (the environment variable overrides it).
DEFAULT_INTERVAL_S = 30.0


def interval_s() -> float:
    """``PPCL_PROGRESS_INTERVAL`` (seconds, > 0), else :data:`DEFAULT_INTERVAL_S`; a bad value is ignored (a log
    setting must not stop a run)."""
    try:
        value = float(os.environ.get("PPCL_PROGRESS_INTERVAL", ""))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams (pytest's capture, a redirected file)
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class PlainProgress:
    """Periodic plain lines for a non-terminal stderr (see the module doc). ``clock``: injectable for tests."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, every: float | None = None,
                 stream: IO[str] | None = None, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.every = interval_s() if every is None else every
        self.stream, self.clock = stream, clock
        self.postfix: dict[str, Any] = {}
        self.start = self.last = clock()
        self.lines = 0
        self.closed = False

    # -- tqdm's interface
    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._write(self._line(now))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:  # tqdm redraws; a log line is written on the clock only
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.lines:  # only a run long enough to have reported gets a closing line
            elapsed = self.clock() - self.start
            self._write(f"{self._label()}{self._count()} in {_duration(elapsed)}{self._rate(elapsed)}{self._post()}")

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress without an iterable is not iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the line
    def _label(self) -> str:
        return f"{self.desc}: " if self.desc else ""

    def _count(self) -> str:
        unit = self.unit if self.n == 1 else f"{self.unit}s"
        if self.total:
            return f"{self.n:g}/{self.total:g} {unit} ({100 * self.n / self.total:.0f}%)"
        return f"{self.n:g} {unit}"

    def _rate(self, elapsed: float) -> str:
        done = self.n - self.initial
        if elapsed <= 0 or done <= 0:
            return ""
        rate = done / elapsed
        text = f", {rate:.2f} {self.unit}s/s" if rate >= 1 else f", {1 / rate:.2f} s/{self.unit}"
        return text

    def _post(self) -> str:
        return "".join(f", {k}={v}" for k, v in self.postfix.items())

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        line = f"{self._label()}{self._count()}{self._rate(elapsed)}"
        done = self.n - self.initial
        if self.total and done > 0 and elapsed > 0:
            line += f", ETA {_duration((self.total - self.n) * elapsed / done)}"
        return line + self._post()

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr  # looked up per line: pytest and the demo swap sys.stderr
        self.lines += 1
        print(line, file=stream, flush=True)


class _Silent(PlainProgress):
    """``disable=True``: counts, writes nothing."""

    def _write(self, line: str) -> None:
        pass


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", initial: float = 0, disable: bool = False, leave: bool = True,
             stream: IO[str] | None = None) -> Any:
    """The progress bar of one loop: tqdm on a terminal, :class:`PlainProgress` lines otherwise, nothing with
    ``disable`` (see the module doc). Same arguments as tqdm's (the ones ppcl uses)."""
    if disable:
        return _Silent(iterable, total=total, desc=desc, unit=unit, initial=initial)
    out = stream or sys.stderr
    if _is_terminal(out):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=out)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, stream=stream)
