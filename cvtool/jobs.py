"""Batch jobs that survive interruptions and split across machines: --resume, --shard K/N, signals.

A :class:`BatchJob` is the output of a batch command (predict, and later tta,
ensemble, gradcam, segment): a rows CSV, its errors CSV and a small JSON
sidecar that records which model and options made them. While it runs, rows
go to fixed partial names (``preds.csv.part``, ``preds.errors.csv.part``),
flushed after every batch; at the end they are renamed into place. A killed
run leaves only the partials, which ``--resume`` continues.

Hooking a command up takes a few lines::

    job = BatchJob(out, overwrite=overwrite, resume=resume, shard=shard)  # refuses early
    items = list_images(input)
    ...load the model...
    todo = job.open(items, header, {"command": "predict", "model": model_fingerprint(model)})
    with job:
        for batch in ...(todo):
            job.fail_all(batch.failures)
            for item, ... in ...: job.write([item.rel, ...])
            job.flush()
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cvtool import __version__
from cvtool.errors import Interrupted, UsageError
from cvtool.images import InputItem
from cvtool.outputs import CsvWriter, count_rows, errors_path, write_json
from cvtool.progress import warn

ERRORS_HEADER = ("path", "error")
SIDECAR_FORMAT = 1
# What must agree between a partial and its resumption, and between shards that are merged.
IDENTITY_KEYS = ("command", "model", "header")


@dataclass
class RunResult:
    """What a batch command did: rows written, inputs that failed, files written."""

    processed: int
    failed: int
    out: Path
    errors: Path

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``index`` from 0, as Kubernetes' JOB_COMPLETION_INDEX)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, rel: str) -> bool:
        return shard_of(rel, self.count) == self.index


def parse_shard(spec: str | Shard | None) -> Shard | None:
    """``"K/N"`` -> :class:`Shard`; None or "" -> None (the whole input)."""
    if spec is None or isinstance(spec, Shard):
        return spec
    spec = spec.strip()
    if not spec:
        return None
    try:
        k, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard takes K/N (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {spec}: K must be from 0 to N-1 and N at least 1")
    return Shard(k, n)


def shard_of(rel: str, count: int) -> int:
    """The shard of a relative path: a stable hash, the same on every machine and listing order."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def take_shard(items: Iterable[InputItem], shard: Shard | None) -> list[InputItem]:
    return list(items) if shard is None else [item for item in items if shard.holds(item.rel)]


def partial_path(path: str | os.PathLike) -> Path:
    """``preds.csv`` -> ``preds.csv.part``: where rows go until the run finishes."""
    path = Path(path)
    return path.with_name(path.name + ".part")


def sidecar_path(out: str | os.PathLike) -> Path:
    """``preds.csv`` -> ``preds.job.json``: which model and options made the CSV."""
    out = Path(out)
    return out.with_name(out.stem + ".job.json")


def read_sidecar(out: str | os.PathLike) -> dict | None:
    path = sidecar_path(out)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def model_fingerprint(model) -> str:
    """A digest of the model file and its class list/input size; equal digests mean the same model.

    ``model`` is a model spec (run directory or file) or a loaded ``Classifier``.
    """
    from cvtool.bundle import read_meta, resolve_model_path

    spec = getattr(model, "source", model)
    try:
        model_file, run_dir = resolve_model_path(spec)
    except UsageError:
        return f"unknown:{spec}"
    digest = hashlib.sha256()
    with open(model_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if run_dir is not None:
        meta = read_meta(run_dir)
        digest.update(json.dumps([meta["class_names"], meta["image_size"]]).encode("utf-8"))
    return "sha256:" + digest.hexdigest()


class BatchJob:
    """The resumable, shardable output of a batch command: rows CSV, errors CSV, sidecar.

    Construct it first (it refuses an existing output without ``overwrite``,
    and an interrupted partial without ``resume`` or ``overwrite``), then
    :meth:`open` it with the inputs: it returns those still to do (this shard,
    minus the rows and errors already kept). Use it as a context manager:
    leaving normally renames the partials into place; leaving with an error
    or a signal keeps them and says how to resume.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        overwrite: bool = False,
        resume: bool = False,
        shard: str | Shard | None = None,
        errors: str | os.PathLike | None = None,
        grouped: bool = False,
    ):
        """``errors``: the errors CSV (default: beside ``out``); ``grouped``: several rows per input."""
        self.out = Path(out)
        self.errors = Path(errors) if errors is not None else errors_path(self.out)
        self.grouped = grouped
        self.sidecar = sidecar_path(self.out)
        self.parts = (partial_path(self.out), partial_path(self.errors))
        self.resume, self.shard = resume, parse_shard(shard)
        self.complete = False  # True: a finished output exists and --resume has nothing to do
        self.processed = self.failed = self.kept = 0
        self._rows: CsvWriter | None = None
        self._errs: CsvWriter | None = None
        if self.out.is_dir():
            raise UsageError(f"{self.out} is a folder; give a file name for the output")
        has_partial = any(p.exists() for p in self.parts)
        if self.out.exists() and not overwrite:
            if not (resume and not has_partial):
                raise UsageError(f"{self.out} already exists; pass --overwrite to replace it")
            self.complete = True
        if has_partial and not resume and not overwrite:
            raise UsageError(
                f"{self.parts[0]} holds an interrupted run; pass --resume to continue it or --overwrite to start over"
            )
        if has_partial and not resume:
            for p in self.parts:
                p.unlink(missing_ok=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def open(self, items: Sequence[InputItem], header: Sequence[str], identity: dict) -> list[InputItem]:
        """Start (or continue) the job; returns the inputs still to do, in input order."""
        identity = {**identity, "header": list(header), "shard": str(self.shard) if self.shard else None}
        mine = take_shard(items, self.shard)
        if self.complete:
            self._check_same(identity, f"the finished {self.out}")
            self.processed, self.failed = count_rows(self.out, self.grouped), count_rows(self.errors)
            return []
        if self.resume and any(p.exists() for p in self.parts):
            self._check_same(identity, f"the interrupted run in {self.parts[0]}")
        write_json(
            self.sidecar,
            {
                "format": SIDECAR_FORMAT,
                **identity,
                "errors": self.errors.name if self.errors.parent == self.out.parent else str(self.errors.resolve()),
                "grouped": self.grouped,
                "inputs": len(mine),
                "cvtool": __version__,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        self._rows = CsvWriter(self.out, header, partial=self.parts[0], resume=self.resume, grouped=self.grouped)
        self._errs = CsvWriter(self.errors, ERRORS_HEADER, partial=self.parts[1], resume=self.resume)
        done = self._rows.keys | self._errs.keys
        self.processed, self.failed = self._rows.kept, self._errs.kept
        self.kept = self.processed + self.failed
        return [item for item in mine if item.rel not in done]

    def _check_same(self, identity: dict, what: str) -> None:
        old = read_sidecar(self.out)
        if old is None:
            return  # no record (an older cvtool, or written by hand): trust the user's --resume
        for key in (*IDENTITY_KEYS, "shard"):
            if old.get(key) != identity.get(key):
                raise UsageError(f"{what} was made with a different {key}; pass --overwrite to start over")

    def write(self, row: Sequence) -> None:
        self._rows.write(row)
        self.processed += 1

    def write_group(self, rows: Sequence[Sequence]) -> None:
        """The rows of one input (``grouped`` jobs): several rows, one input processed."""
        for row in rows:
            self._rows.write(row)
        self.processed += 1

    def fail(self, rel: str, reason: str) -> None:
        """One bad input: a row in the errors CSV and a warning line."""
        self._errs.write([rel, reason])
        warn(f"{rel}: {reason}")
        self.failed += 1

    def fail_all(self, failures: Iterable) -> None:
        for f in failures:
            self.fail(f.item.rel, f.reason)

    def flush(self) -> None:
        """Call after each batch: what was written survives a kill -9 and is kept by --resume."""
        self._errs.flush()
        self._rows.flush()

    def __enter__(self) -> BatchJob:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._rows is None:
            return
        if exc_type is None:
            self._errs.commit()
            self._rows.commit()
            return
        if not self.processed + self.failed:  # nothing done (e.g. the model failed on the first batch): no partial
            self._errs.discard()
            self._rows.discard()
            self.sidecar.unlink(missing_ok=True)
            return
        self._errs.close()
        self._rows.close()
        if self.processed + self.failed:
            warn(
                f"stopped: {self.processed + self.failed} inputs done are kept in {self.parts[0]}; "
                "run the same command again with --resume to continue"
            )


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the hidden temporary files (``.name.XXXX.part``) an interrupted run left under ``folder``.

    Image files are written to such a temporary name and renamed into place; a
    kill between the two leaves one behind. Called when resuming a run that
    writes image files (gradcam, segment), whose folder only that run writes.
    """
    removed = 0
    for path in Path(folder).rglob(".*.part"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise :class:`Interrupted` in the main thread, so jobs stop cleanly."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {}

    def handler(signum, frame):
        raise Interrupted(signum)

    try:
        for sig in handled:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous.clear()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
