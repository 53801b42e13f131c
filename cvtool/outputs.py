"""Writing result files: the one CSV writer, and atomic file replacement.

A result file appears complete or not at all: everything is written to a
hidden temporary name in the same folder and renamed into place at the end,
so a killed run never leaves a file that looks finished but is not.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cvtool.errors import UsageError


def errors_path(out: str | os.PathLike, suffix: str = ".csv") -> Path:
    """``preds.csv`` -> ``preds.errors.csv``: the errors file beside an output, in its format (``suffix``).

    ``errors_path("preds.parquet", ".parquet")`` is ``preds.errors.parquet``.
    """
    out = Path(out)
    return out.with_name(out.stem + ".errors" + suffix)


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing result unless ``overwrite``; make parent folders."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it")
    check_output_location(path)
    return path


def check_output_location(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Refuse (exit 2) an output that cannot be written, before any work; make its parent folders.

    ``path`` is an output file, or with ``folder`` an output folder. Refused: a
    file where a folder is needed (on the way to ``path``, or ``path`` itself for
    a folder output), a folder where a file is needed, and a folder this user
    cannot write to. Commands call it (through :class:`cvtool.locks.OutputLock`)
    before loading a model, so a typo'd ``--out`` costs no time.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; give a folder")
    if not folder and path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name for the output")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), parent)
        raise UsageError(f"cannot write {path}: {blocker} is a file, not a folder") from None
    except PermissionError:
        raise UsageError(f"cannot create the folder {parent}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"cannot create the folder {parent}: {exc.strerror or exc}") from None
    for place in (parent, path) if folder and path.is_dir() else (parent,):
        if not os.access(place, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {place}: permission denied")
    return path


_ESCAPED_IN_CELLS = re.compile("[\\\\\udc80-\udcff]")  # a backslash, or a byte that is not UTF-8
_ESCAPE = re.compile(r"\\(\\|x[89a-fA-F][0-9a-fA-F])")


def path_cell(rel: str) -> str:
    r"""A relative path as a CSV cell: every file name becomes valid UTF-8 text, reversibly.

    File names are bytes on POSIX; Python reads bytes that are not UTF-8 as lone
    surrogates (``os.fsdecode``), which no UTF-8 file can hold. Such a byte is
    written ``\xNN`` (two lower-case hex digits) and a backslash as two; every
    other character is kept, so ordinary names are written as they are:
    ``b"caf\xe9.jpg"`` -> ``caf\xe9.jpg``. :func:`cell_path` reverses it.
    """
    return _ESCAPED_IN_CELLS.sub(lambda m: "\\\\" if m[0] == "\\" else f"\\x{ord(m[0]) - 0xDC00:02x}", rel)


def cell_path(cell: str) -> str:
    """The relative path (as ``os.fsdecode`` gives it) that a cell written by :func:`path_cell` stands for.

    A backslash that starts no escape is kept, so cells written by hand or by older versions still work.
    """
    return _ESCAPE.sub(lambda m: "\\" if m[1] == "\\" else chr(0xDC00 + int(m[1][1:], 16)), cell)


def temp_path(path: Path, suffix: str = ".part") -> Path:
    """A new, empty, hidden file beside ``path`` (``.NAME.<random><suffix>``), to be renamed over it.

    Created with mode 0o666 less the umask, as ``open()`` creates files (``tempfile.mkstemp`` makes
    them 0600, and the rename would hand that to every result: unreadable to other users).
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


class CsvWriter:
    """Streams rows to a temporary file and renames it to ``path`` on :meth:`commit`.

    Used as a context manager: leaving the block normally commits, leaving it
    with an exception removes the partial file.

    With ``partial`` (a fixed file name, e.g. ``preds.csv.part``) the writer is
    resumable: leaving with an exception keeps the partial file, and ``resume``
    reopens an existing one, keeping its complete rows (a line torn by a kill
    is dropped). ``kept`` counts them and ``keys`` holds their first cells.

    This CSV file is also the journal of every other result format
    (:mod:`cvtool.formats`): their writers subclass it and convert the finished
    journal in :meth:`_publish`, so resuming works the same for all of them.
    """

    name = "csv"  # the result format (cvtool.formats.FORMATS)
    suffix = ".csv"

    def __init__(
        self,
        path: str | os.PathLike,
        header: Sequence[str],
        partial: str | os.PathLike | None = None,
        resume: bool = False,
        grouped: bool = False,
    ):
        self.path = Path(path)
        self.header = list(header)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_partial = partial is not None
        self.tmp = Path(partial) if partial is not None else temp_path(self.path)
        self.keys: set[str] = set()
        self.kept = 0
        if resume and self.tmp.exists() and self._recover(list(header), grouped):
            self._file = open(self.tmp, "a", newline="", encoding="utf-8")
            self._csv = csv.writer(self._file)
        else:
            self._file = open(self.tmp, "w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._file)
            self._csv.writerow(header)
        self.rows = self.kept

    def _recover(self, header: list[str], grouped: bool = False) -> bool:
        """Keep the complete rows of an interrupted partial file; False if it holds nothing usable.

        ``grouped``: several rows per key (an image's pixel counts); the last
        key's rows may be only some of them, so they are all dropped (that
        input is done again) and the file is rewritten without them.
        """
        with open(self.tmp, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1  # a kill can tear the last line: drop it
            f.truncate(end)
        reader = csv.reader(io.StringIO(data[:end].decode("utf-8", errors="replace"), newline=""))
        first = next(reader, None)
        if first is None:
            return False
        if first != header:
            raise UsageError(f"{self.tmp} has other columns than this run would write; pass --overwrite to start over")
        rows = [row for row in reader if row]
        if grouped and rows:
            last = rows[-1][0]
            kept = [row for row in rows if row[0] != last]
            if len(kept) < len(rows):
                tmp = temp_path(self.tmp)
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    writer = csv.writer(f)
                    writer.writerow(header)
                    writer.writerows(kept)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.tmp)
            rows = kept
        for row in rows:
            self.keys.add(row[0])
        self.kept = len({row[0] for row in rows}) if grouped else len(rows)
        return True

    def write(self, row: Iterable[Any]) -> None:
        self._csv.writerow(row)
        self.rows += 1

    def flush(self) -> None:
        """Hand written rows to the OS, so that they survive a kill of this process."""
        self._file.flush()

    def commit(self) -> Path:
        """Put the finished rows at ``path`` (all of them, or, if this fails, nothing there)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._publish()
        return self.path

    def _publish(self) -> None:
        """The journal is the CSV: rename it into place. Other formats convert it (:mod:`cvtool.formats`)."""
        os.replace(self.tmp, self.path)

    @staticmethod
    def read(path: str | os.PathLike) -> Iterator[list[str]]:
        """The header, then each row of a CSV written by this class, as its cells' text."""
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if row:
                    yield row

    def close(self) -> None:
        """Close without committing, keeping a resumable partial file."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> CsvWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif self.keep_partial:
            self.close()
        else:
            self.discard()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".part") -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block succeeds.

    Every file cvtool writes goes through here (or :class:`CsvWriter`): a killed
    run leaves at most a hidden ``.part`` file, never a half-written result.
    ``suffix`` keeps an extension that a writer needs (``.keras`` for Keras).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Iterable[Any]]) -> Path:
    with CsvWriter(path, header) as writer:
        for row in rows:
            writer.write(row)
    return Path(path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight")
    return path


def save_image(img, path: str | os.PathLike, **params: Any) -> Path:
    """Save a Pillow image atomically; the format comes from the suffix (``params`` go to ``Image.save``)."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot write images with the extension {path.suffix!r}: {path}")
    return write_bytes_atomic(path, encode_image(img, fmt, **params))


def encode_image(img, fmt: str, **params: Any) -> bytes:
    """A Pillow image encoded in memory as Pillow's ``fmt`` (``PNG``, ``JPEG``) would write it to a file.

    Example: ``write_bytes_atomic("a.png", encode_image(img, "PNG"))``.
    """
    from io import BytesIO

    buf = BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def format_score(p: float) -> str:
    return f"{float(p):.6f}"
