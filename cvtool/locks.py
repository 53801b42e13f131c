"""One writer per output: an exclusive lock held for the whole run of every command that writes one.

Two runs writing the same output at once (overlapping cron runs, a job retried
while the first still runs) would share one partial file and mix their rows.
So each command locks its output first, before it checks what exists: a lock
file beside the output (``preds.csv.lock``; ``runs/clothes.lock`` for a
folder), locked with ``flock``. It records the owner (pid, host, start time)
for the message a second writer gets::

    error: another run (pid 4242 on node-7, started 2025-05-02T10:00:01+00:00) is writing out/preds.csv; ...

The kernel releases a ``flock`` when its process ends, however it ends
(``kill -9``, a crash, out of memory), so a lock file left behind is simply
taken over by the next run; a run that ends normally, by an error or by a
signal removes its lock file. (On NFS, Linux turns ``flock`` into an NFS lock,
which the server releases when a dead client's lease runs out.) Use :class:`OutputLock` as a context manager, or
:func:`holds_output_lock` on a function whose argument names the output.
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cvtool.errors import UsageError
from cvtool.outputs import check_output_location
from cvtool.progress import warn

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; outputs are not locked there
    fcntl = None

LOCK_SUFFIX = ".lock"
_held: set[tuple[str, int]] = set()  # (lock file, thread) of the locks held in this process
F = TypeVar("F", bound=Callable)


def lock_path(target: str | os.PathLike) -> Path:
    """``out/preds.csv`` -> ``out/preds.csv.lock``, ``runs/clothes`` -> ``runs/clothes.lock``.

    The output's real path is used, so two names of one output (a symlink, a relative path) share a lock.
    """
    real = Path(os.path.realpath(target))
    return real / LOCK_SUFFIX if not real.name else real.with_name(real.name + LOCK_SUFFIX)


class OutputLock:
    """An exclusive lock on an output file or folder, held from :meth:`acquire` to :meth:`release`.

    Acquiring first checks the output can be written (:func:`cvtool.outputs.check_output_location`,
    which also makes the parent folders), then refuses (exit 2) when another live run holds the lock.
    A thread that already holds the lock on the same output acquires it again (nested): commands
    take it on entry and :class:`cvtool.jobs.BatchJob` takes it too, for those who use it directly;
    the outermost holder releases it.

    Example::

        with OutputLock("out/preds.csv"):
            ...  # write out/preds.csv
    """

    def __init__(self, target: str | os.PathLike, *, folder: bool = False):
        self.target = Path(target)
        self.folder = folder
        self.path = lock_path(self.target)
        self._key = (str(self.path), 0)
        self._fd: int | None = None
        self._state = "free"  # "held"; "nested": this thread held it already, the outer holder releases it

    def acquire(self) -> OutputLock:
        self._key = (str(self.path), threading.get_ident())
        if self._key in _held:
            self._state = "nested"
            return self
        check_output_location(self.target, folder=self.folder)
        if fcntl is not None:
            self._fd = self._lock()
        self._state = "held"
        _held.add(self._key)
        return self

    def _lock(self) -> int | None:
        for _ in range(100):
            fd, writable = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _describe_owner(fd)
                os.close(fd)
                raise UsageError(
                    f"another run{owner} is writing {self.target}; wait for it to finish or stop it "
                    f"(its lock: {self.path})"
                ) from None
            except OSError:  # a file system without locks: go on unlocked, as before locks existed
                os.close(fd)
                warn(
                    f"{self.path.parent} does not support file locks; {self.target} is not protected from a second run"
                )
                return None
            # The previous owner may have removed the file between our open and our flock: lock the file
            # that is there now, or a third run could create a new one and lock it as well.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same and writable:
                owner = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(owner) + "\n").encode("utf-8"))
                return fd
            if same:
                return fd  # another user's lock file, left by a dead run: locked, but its record stays
            os.close(fd)
        raise UsageError(f"cannot lock {self.path}: it keeps being replaced by other runs")

    def _open(self) -> tuple[int, bool]:
        """The lock file, created if needed; (fd, whether the owner record can be written)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), True
        except PermissionError:
            try:  # another user's lock file: flock needs only to read it
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), False
            except OSError:
                raise UsageError(f"cannot write to {self.path.parent}: permission denied") from None
        except OSError as exc:
            raise UsageError(f"cannot write to {self.path.parent}: {exc.strerror or exc}") from None

    def release(self) -> None:
        """Give the lock back and remove the lock file (a nested holder leaves both to the outer one).

        Safe to call twice; also called when the object is dropped (a job left without ``with``).
        """
        state, self._state = self._state, "free"
        if state != "held":
            return
        _held.discard(self._key)
        if self._fd is not None:
            # Removed while still locked: whoever opened the old file finds it replaced (see _lock).
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # another user's file in a sticky folder: the next run takes the stale lock over
            finally:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: the process end releases the flock
            pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_owner(fd: int) -> str:
    """`` (pid 4242 on node-7, started ...)`` from a lock file's record; empty if it holds none yet."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode("utf-8"))
        parts = [f"pid {int(owner['pid'])} on {owner['host']}"]
        if owner.get("started"):
            parts.append(f"started {owner['started']}")
        return f" ({', '.join(parts)})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def holds_output_lock(param: str, *, folder: bool = False) -> Callable[[F], F]:
    """Decorate a function that writes the output named by its argument ``param``: it runs holding the lock.

    Example::

        @holds_output_lock("out_dir", folder=True)
        def evaluate(model, data, out_dir, ...): ...
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            target = bound.arguments[param]
            with OutputLock(target, folder=folder):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
