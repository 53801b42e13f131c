"""Result formats: CSV, JSON Lines and Parquet, in one table, picked by ``--out``'s suffix or ``--format``.

Every format is written through one journal: rows go to a CSV file
(:class:`cvtool.outputs.CsvWriter`, the ``.part`` that ``--resume`` continues,
flushed after every batch), and :meth:`commit` turns the finished journal into
the final file beside it (streamed, a row group at a time for Parquet) and
renames it into place. A killed run therefore resumes the same way whatever the
format, and a result appears complete or not at all.

Values are typed by column name (:func:`column_type`): ``score*`` and
``fraction`` are numbers (float64, the value the CSV prints: 6 decimals),
``pixels`` an integer, everything else text. Path cells keep the CSV's ``\\xNN``
escaping (:func:`cvtool.outputs.path_cell`), so every file name is valid UTF-8.

Example::

    writer_class = result_format("preds.parquet")          # ParquetWriter
    with writer_class("preds.parquet", ["path", "label", "score"]) as w:
        w.write(["a.jpg", "cat", "0.912345"])
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

from cvtool.errors import UnusableError, UsageError
from cvtool.outputs import CsvWriter, atomic_path, format_score
from cvtool.registry import Registry

FORMATS = Registry("--format")
ROW_GROUP_ROWS = 65_536  # rows per Parquet row group: what the conversion holds in memory at once
PARQUET_EXTRA = 'Parquet results need pyarrow: pip install "cvtool[cloud]"'

FORMATS.register("csv", help="comma-separated text", suffix=".csv")(CsvWriter)


def column_type(name: str) -> str:
    """``"float"``, ``"int"`` or ``"string"``: how a column's cells are typed in JSON Lines and Parquet.

    Example: ``column_type("score_2")`` is ``"float"``, ``column_type("label")`` is ``"string"``.
    """
    base = re.sub(r"_\d+$", "", name)
    return {"score": "float", "fraction": "float", "pixels": "int"}.get(base, "string")


def _typed(cell: str, kind: str):
    """A journal cell as the value JSON Lines and Parquet hold (an empty number cell is null)."""
    if kind == "string":
        return cell
    if cell == "":
        return None
    return float(cell) if kind == "float" else int(cell)


def _cell(value, kind: str) -> str:
    """A typed value back as the CSV writes it (merge reads every format as text cells)."""
    if value is None:
        return ""
    if kind == "float":
        return format_score(value)
    return str(value)


def _journal_rows(journal: Path) -> Iterator[list[str]]:
    """The data rows of a finished journal (its header line skipped)."""
    rows = CsvWriter.read(journal)
    next(rows, None)
    yield from rows


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class _ConvertedWriter(CsvWriter):
    """A format written by converting the finished CSV journal; subclasses define :meth:`_convert`."""

    def _publish(self) -> None:
        try:
            with atomic_path(self.path) as tmp:
                self._convert(self.tmp, tmp)
                _fsync(tmp)
        except BaseException:
            if not self.keep_partial:  # a resumable journal stays for --resume; a temporary one goes
                self.tmp.unlink(missing_ok=True)
            raise
        self.tmp.unlink(missing_ok=True)

    def _convert(self, journal: Path, dest: Path) -> None:
        raise NotImplementedError


@FORMATS.register("jsonl", help="JSON Lines, one object per row", suffix=".jsonl")
class JsonlWriter(_ConvertedWriter):
    """JSON Lines: one object per row, keys the CSV header, scores JSON numbers, UTF-8.

    A score that is not finite (a model that outputs NaN) is written ``null``, which every JSON reader takes.
    """

    name = "jsonl"
    suffix = ".jsonl"

    def _convert(self, journal: Path, dest: Path) -> None:
        kinds = [column_type(h) for h in self.header]
        with open(dest, "w", encoding="utf-8", newline="\n") as f:
            for row in _journal_rows(journal):
                obj = {}
                for name, kind, cell in zip(self.header, kinds, row):
                    value = _typed(cell, kind)
                    obj[name] = None if isinstance(value, float) and not math.isfinite(value) else value
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    @staticmethod
    def read(path: str | os.PathLike) -> Iterator[list[str]]:
        """The header (the first object's keys), then each row as CSV cell text; nothing for an empty file."""
        header: list[str] | None = None
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise UnusableError(f"{path} line {n} is not a JSON object") from None
                if not isinstance(obj, dict):
                    raise UnusableError(f"{path} line {n} is not a JSON object")
                if header is None:
                    header = list(obj)
                    kinds = [column_type(h) for h in header]
                    yield header
                yield [_cell(obj.get(h), kind) for h, kind in zip(header, kinds)]


def _pyarrow():
    """pyarrow and pyarrow.parquet, imported when a Parquet file is written or read (an optional extra)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError(PARQUET_EXTRA) from None
    return pyarrow, pyarrow.parquet


def arrow_schema(header: list[str]):
    """The Parquet schema of a header: float64 numbers, int64 pixel counts, UTF-8 strings."""
    pa, _ = _pyarrow()
    types = {"float": pa.float64(), "int": pa.int64(), "string": pa.string()}
    return pa.schema([pa.field(h, types[column_type(h)]) for h in header])


@FORMATS.register("parquet", help="Apache Parquet, typed columns; needs pyarrow", suffix=".parquet")
class ParquetWriter(_ConvertedWriter):
    """Parquet: typed columns (:func:`arrow_schema`), written a row group (:data:`ROW_GROUP_ROWS`) at a time."""

    name = "parquet"
    suffix = ".parquet"

    @staticmethod
    def check_available() -> None:
        """Refuse (exit 2) before any work when pyarrow is not installed."""
        if importlib.util.find_spec("pyarrow") is None:
            raise UsageError(PARQUET_EXTRA)

    def _convert(self, journal: Path, dest: Path) -> None:
        pa, pq = _pyarrow()
        schema = arrow_schema(self.header)
        kinds = [column_type(h) for h in self.header]
        with pq.ParquetWriter(dest, schema) as writer:
            chunk: list[list[str]] = []
            for row in _journal_rows(journal):
                chunk.append(row)
                if len(chunk) == ROW_GROUP_ROWS:
                    writer.write_table(self._table(pa, schema, kinds, chunk))
                    chunk = []
            if chunk:
                writer.write_table(self._table(pa, schema, kinds, chunk))

    @staticmethod
    def _table(pa, schema, kinds: list[str], rows: list[list[str]]):
        columns = [
            pa.array([_typed(row[i], kind) for row in rows], type=field.type)
            for i, (field, kind) in enumerate(zip(schema, kinds))
        ]
        return pa.Table.from_arrays(columns, schema=schema)

    @staticmethod
    def read(path: str | os.PathLike) -> Iterator[list[str]]:
        """The header (the schema's names), then each row as CSV cell text, a row group at a time."""
        _, pq = _pyarrow()
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own types for a file that is not Parquet
            raise UnusableError(f"{path} is not a readable Parquet file: {exc}") from None
        header = parquet.schema_arrow.names
        kinds = [column_type(h) for h in header]
        yield list(header)
        for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
            columns = [[_cell(v, kind) for v in batch.column(i).to_pylist()] for i, kind in enumerate(kinds)]
            yield from (list(row) for row in zip(*columns))


def format_of_suffix(path: str | os.PathLike) -> type[CsvWriter] | None:
    """The format a file name's suffix names (``.csv``, ``.jsonl``, ``.parquet``; any case), else None."""
    suffix = Path(path).suffix.lower()
    return next((FORMATS.get(name) for name in FORMATS if FORMATS.get(name).suffix == suffix), None)


def result_format(out: str | os.PathLike, format: str | None = None) -> type[CsvWriter]:
    """The writer class of the result file ``out``: ``format`` if given, else the one ``out``'s suffix names.

    Refused (exit 2): an unknown ``format``; a ``format`` that another known suffix contradicts
    (``preds.csv`` with ``parquet``); an ``out`` whose suffix names no format, without ``format``
    (an unknown suffix with a ``format`` is allowed); ``parquet`` without pyarrow installed.

    Args:
        out: the result file to write.
        format: ``csv``, ``jsonl`` or ``parquet`` (``--format`` / ``CVTOOL_FORMAT``), or None.

    Example: ``result_format("preds.jsonl").name`` is ``"jsonl"``.
    """
    by_suffix = format_of_suffix(out)
    if format:
        chosen = FORMATS.get(format.strip().lower())
        if by_suffix is not None and by_suffix is not chosen:
            raise UsageError(
                f"--format {chosen.name} (or CVTOOL_FORMAT) contradicts the name {Path(out).name}, "
                f"a {by_suffix.name} file; name it {Path(out).stem}{chosen.suffix} or drop --format"
            )
    elif by_suffix is None:
        raise UsageError(
            f"cannot tell the results format from the name {Path(out).name}: end it with "
            f"{', '.join(FORMATS.get(n).suffix for n in FORMATS)}, or pass --format {FORMATS.choices()}"
        )
    else:
        chosen = by_suffix
    check = getattr(chosen, "check_available", None)
    if check is not None:
        check()
    return chosen


def stored_format(path: str | os.PathLike, recorded: str | None = None) -> type[CsvWriter]:
    """The format of an existing result file: the one its suffix names, else the one its sidecar
    ``recorded`` (``--out preds.txt --format jsonl``), else CSV (older cvtool versions wrote only CSV)."""
    by_suffix = format_of_suffix(path)
    if by_suffix is not None:
        return by_suffix
    return FORMATS.get(recorded) if recorded in FORMATS else CsvWriter


def count_rows(path: str | os.PathLike, format: type[CsvWriter] = CsvWriter, distinct: bool = False) -> int:
    """Data rows of a result file (0 if it does not exist); ``distinct``: distinct first cells (grouped jobs).

    Example: ``count_rows("preds.parquet", ParquetWriter)``.
    """
    path = Path(path)
    if not path.exists():
        return 0
    rows = format.read(path)
    next(rows, None)
    if distinct:
        return len({row[0] for row in rows})
    return sum(1 for _ in rows)


def read_header(path: str | os.PathLike, format: type[CsvWriter]) -> list[str] | None:
    """The columns of a result file; None for a file with none (an empty JSON Lines file)."""
    return next(format.read(path), None)
