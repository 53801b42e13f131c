"""Progress reporting: a tqdm bar on a terminal, periodic log lines otherwise.

Cron jobs and containers get one plain line every few seconds on stderr
instead of carriage-return bars; ``quiet`` silences both. While a bar is on
screen, :func:`warn` and :func:`info` print through tqdm (the bar is cleared,
the line printed, the bar redrawn), so a warning never lands in the middle of a
bar; a finished bar stays on screen at 100%.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from cvtool.errors import env_int

LOG_INTERVAL = 10  # seconds between log lines without a terminal; $CVTOOL_LOG_INTERVAL sets it (tests use 0)


def log_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal."""
    return env_int("CVTOOL_LOG_INTERVAL", LOG_INTERVAL)


_bars: list = []  # the tqdm bars on screen now: lines printed meanwhile go through tqdm.write


def _print(line: str) -> None:
    if _bars:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """Counts processed items (``unit``); use as a context manager.

    Without a terminal, one line every :func:`log_interval` seconds.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        quiet: bool = False,
        interval: float | None = None,
        unit: str = "img",
        leave: bool = True,
    ):
        self.total, self.desc, self.quiet = total, desc, quiet
        self.interval = log_interval() if interval is None else interval
        self.done = 0
        self._bar = None
        self._start = self._last = time.monotonic()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            # A finished bar stays at 100%, except the per-epoch batch bars of training (leave=False).
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave)
            _bars.append(self._bar)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.quiet:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._log(now)

    def _log(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.done}{of} ({rate:.1f}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            _bars.remove(self._bar)
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warn(message: str) -> None:
    """One warning line on stderr; printed even with --quiet, which only silences progress."""
    _print(f"warning: {message}")


def info(message: str, quiet: bool = False) -> None:
    """One informational line on stderr, silenced by --quiet."""
    if not quiet:
        _print(message)


@contextlib.contextmanager
def quiet_stderr():
    """Point file descriptor 2 at /dev/null for the block: native code (LiteRT's "Created TensorFlow Lite
    XNNPACK delegate", converter statistics, Ray's C++ core) prints there and Python cannot silence it."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable descriptor 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
