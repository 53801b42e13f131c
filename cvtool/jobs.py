"""Batch jobs that survive interruptions and split across machines: --resume, --shard K/N, signals.

A :class:`BatchJob` is the output of a batch command (predict, tta, ensemble,
gradcam, segment): a rows file (CSV, JSON Lines or Parquet: :mod:`cvtool.formats`),
its errors file in the same format and a small JSON sidecar that records which
model and options made them. While it runs, rows go to fixed partial names
(``preds.csv.part``, ``preds.errors.csv.part``; CSV journals whatever the format),
flushed after every batch; at the end they are converted if need be and renamed
into place. A killed run leaves only the partials, which ``--resume`` continues.

A job locks its output for the whole run (:mod:`cvtool.locks`: one writer per
output), and a resumed run does the inputs the interrupted run started with
(recorded in ``preds.csv.inputs.part``): files added to INPUT since then are
reported and skipped, so rows stay in input order and shards still merge.

Hooking a command up takes a few lines::

    @holds_output_lock("out")  # the lock covers the whole command, from its first check
    def predict(model, input, out, *, overwrite=False, resume=False, shard=None, ...):
        job = BatchJob(out, overwrite=overwrite, resume=resume, shard=shard)  # refuses early
        items = list_images(input)
        ...load the model...
        todo = job.open(items, header, {"command": "predict", "model": model_fingerprint(model), "settings": {...}})
        with job:
            for batch in ...(todo):
                job.fail_all(batch.failures)
                for item, ... in ...: job.write([item.rel, ...])
                job.flush()
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import json
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cvtool import __version__
from cvtool.errors import Interrupted, UnusableError, UsageError
from cvtool.formats import count_rows, result_format
from cvtool.images import InputItem
from cvtool.locks import OutputLock
from cvtool.outputs import CsvWriter, cell_path, errors_path, path_cell, write_csv, write_json
from cvtool.progress import warn
from cvtool.storage import flushed, is_url

ERRORS_HEADER = ("path", "error")
INPUTS_HEADER = ("path", "file")
SIDECAR_FORMAT = 1
# What must agree between a partial and its resumption, and between shards that are merged: the command,
# the model(s) with their weights, every option that changes a row ("settings": rule, rule weights, label
# format, views...), and the columns.
IDENTITY_KEYS = ("command", "model", "settings", "header")


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


def inputs_path(out: str | os.PathLike) -> Path:
    """``preds.csv`` -> ``preds.csv.inputs.part``: the inputs a run started with, kept until it finishes."""
    out = Path(out)
    return out.with_name(out.name + ".inputs.part")


def identity_difference(old: dict, new: dict) -> str | None:
    """The first setting in which two jobs' identities differ, as ``label_format (wnid, now name)``; None if none.

    ``old`` and ``new`` are sidecars or identities (see :data:`IDENTITY_KEYS`); "settings"
    is compared entry by entry so the message names the option.
    """
    for key in IDENTITY_KEYS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key != "settings":
            return key if key in ("model", "header") else f"{key} ({_show(a)}, now {_show(b)})"
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return "settings (one was recorded by an older cvtool)"
        return _first_difference(a, b)
    return None


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    """``views.seed (0, now 1)``: nested settings (TTA views, rendering) are followed to the field that differs."""
    name = next(n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n))
    x, y = a.get(name), b.get(name)
    if isinstance(x, dict) and isinstance(y, dict):
        return _first_difference(x, y, f"{prefix}{name}.")
    return f"{prefix}{name} ({_show(x)}, now {_show(y)})"


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return "none" if value is None else str(value)


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
    """A digest of everything that makes a model's outputs; equal digests mean the same model.

    ``model`` is a model spec (run directory, file, SavedModel folder) or a loaded
    ``Classifier``. Run directories: the model file, a hub backbone's files, the class
    list and input size. ``imagenet:NAME``: the network and its weights file (the same
    name with another weights file is another model).
    """
    from cvtool.bundle import HUB_DIR, META_FILE, MODEL_FILE, fetch_model, read_meta, resolve_model_path

    meta = getattr(model, "meta", None) or {}
    spec = fetch_model(getattr(model, "source", model))
    if meta.get("source") == "imagenet":
        weights = meta.get("weights")
        local = Path(weights) if weights and weights != "imagenet" else None
        return f"imagenet:{meta.get('model')}|weights=" + (_digest([local]) if local else "keras-imagenet")
    if meta.get("artefact"):  # an export run by its runtime: the artefact, its labels and the runtime make the scores
        artefact = Path(meta["artefact"])
        files = _files_under(artefact) if artefact.is_dir() else [artefact]
        extra = json.dumps([meta["class_names"], meta["image_size"], meta.get("runtime")]).encode("utf-8")
        return _digest(files, extra, root=artefact.parent)
    folder = Path(spec)
    if folder.is_dir() and not (folder / META_FILE).exists() and not (folder / MODEL_FILE).exists():
        return _digest(_files_under(folder), root=folder)  # a SavedModel (segment)
    try:
        model_file, run_dir = resolve_model_path(spec)
    except (UsageError, UnusableError):
        return f"unknown:{spec}"
    files, extra = [model_file], b""
    if run_dir is not None:
        meta = read_meta(run_dir)
        extra = json.dumps([meta["class_names"], meta["image_size"]]).encode("utf-8")
        if meta.get("feature_extractor"):  # a hub backbone: its SavedModel makes the outputs as much as the head
            files += _files_under(run_dir / meta["feature_extractor"].get("path", HUB_DIR))
    return _digest(files, extra, root=run_dir)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _digest(files: Sequence[Path], extra: bytes = b"", root: Path | None = None) -> str:
    """``sha256:...`` of the files' contents (and, under ``root``, their relative names), then ``extra``."""
    digest = hashlib.sha256()
    for path in files:
        if root is not None and len(files) > 1:
            digest.update(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(extra)
    return "sha256:" + digest.hexdigest()


def file_digest(path: str | os.PathLike | None) -> str | None:
    """``sha256:...`` of a file that changes a job's rows (a class file, a weights file); None for None."""
    return None if path is None else _digest([Path(path)])


class BatchJob:
    """The resumable, shardable output of a batch command: rows file, errors file, sidecar.

    Construct it first: it locks the output (:class:`cvtool.locks.OutputLock`; a
    second live writer is refused), refuses an existing output without
    ``overwrite``, and an interrupted partial without ``resume`` or ``overwrite``.
    Then :meth:`open` it with the inputs: it returns those still to do (this shard,
    minus the rows and errors already kept; a resumed run keeps to the inputs it
    started with). Use it as a context manager: leaving normally renames the
    partials into place; leaving with an error or
    a signal keeps them and says how to resume; either way the lock is released.
    Path cells are written by :func:`cvtool.outputs.path_cell`.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        overwrite: bool = False,
        resume: bool = False,
        shard: str | Shard | None = None,
        errors: str | os.PathLike | None = None,
        grouped: bool = False,
        lock: str | os.PathLike | None = None,
        format: str | None = None,
    ):
        """``errors``: the errors file (default: beside ``out``); ``grouped``: several rows per input;
        ``lock``: the output folder to lock, when the job writes more than ``out`` (gradcam, segment);
        ``format``: ``csv``, ``jsonl`` or ``parquet`` (default: from ``out``'s suffix; see
        :func:`cvtool.formats.result_format`), for the rows and the errors file alike."""
        self.out = Path(out)
        self.format = result_format(self.out, format)  # a bad name or suffix is refused before anything else
        self.errors = Path(errors) if errors is not None else errors_path(self.out, self.format.suffix)
        self.grouped = grouped
        self.sidecar = sidecar_path(self.out)
        self.parts = (partial_path(self.out), partial_path(self.errors))
        self.inputs_record = inputs_path(self.out)
        self.resume, self.shard = resume, parse_shard(shard)
        self.complete = False  # True: a finished output exists and --resume has nothing to do
        self.processed = self.failed = self.kept = 0
        self._rows: CsvWriter | None = None
        self._errs: CsvWriter | None = None
        if self.out.is_dir():
            raise UsageError(f"{self.out} is a folder; give a file name for the output")
        self._lock = OutputLock(self.out if lock is None else lock, folder=lock is not None).acquire()
        try:
            self._refuse_existing(overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _refuse_existing(self, overwrite: bool) -> None:
        resume = self.resume
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
            for p in (*self.parts, self.inputs_record):
                p.unlink(missing_ok=True)

    def open(self, items: Sequence[InputItem], header: Sequence[str], identity: dict) -> list[InputItem]:
        """Start (or continue) the job; returns the inputs still to do, in input order.

        ``identity``: "command", "model" (a fingerprint) and "settings" (every option that
        changes a row) - what a resumed partial and merged shards must agree on.
        """
        # The output folder is made when work starts: a run refused earlier (a model that does not load)
        # leaves no empty --out folder behind.
        self.out.parent.mkdir(parents=True, exist_ok=True)
        identity = {**identity, "header": list(header), "shard": str(self.shard) if self.shard else None}
        identity = json.loads(json.dumps(identity))  # as the sidecar holds it (tuples become lists)
        mine = take_shard(items, self.shard)
        if self.complete:
            self._check_same(identity, f"the finished {self.out}")
            self.processed = count_rows(self.out, self.format, distinct=self.grouped)
            self.failed = count_rows(self.errors, self.format)
            return []
        if self.resume and any(p.exists() for p in self.parts):
            self._check_same(identity, f"the interrupted run in {self.parts[0]}")
            mine = self._started_with(mine)
        else:
            write_csv(self.inputs_record, INPUTS_HEADER, ((path_cell(i.rel), path_cell(str(i.path))) for i in mine))
        write_json(
            self.sidecar,
            {
                "format": SIDECAR_FORMAT,
                **identity,
                "errors": self.errors.name if self.errors.parent == self.out.parent else str(self.errors.resolve()),
                "result_format": self.format.name,
                "grouped": self.grouped,
                "inputs": len(mine),
                "cvtool": __version__,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        self._rows = self.format(self.out, header, partial=self.parts[0], resume=self.resume, grouped=self.grouped)
        self._errs = self.format(self.errors, ERRORS_HEADER, partial=self.parts[1], resume=self.resume)
        done = {cell_path(key) for key in self._rows.keys | self._errs.keys}
        self.processed, self.failed = self._rows.kept, self._errs.kept
        self.kept = self.processed + self.failed
        return [item for item in mine if item.rel not in done]

    def _started_with(self, mine: list[InputItem]) -> list[InputItem]:
        """The inputs the interrupted run recorded, in their order: files added since are reported and
        skipped (done after them, their rows would leave input order); files gone since get an errors row."""
        if not self.inputs_record.is_file():
            return mine  # a partial from an older cvtool: the inputs as listed now
        with open(self.inputs_record, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        recorded = [(cell_path(row[0]), cell_path(row[1])) for row in rows if len(row) >= 2]
        listed = {item.rel: item for item in mine}
        known = {rel for rel, _ in recorded}
        added = [rel for rel in listed if rel not in known]
        if added:
            shown = ", ".join(path_cell(rel) for rel in added[:3]) + (", ..." if len(added) > 3 else "")
            warn(
                f"{len(added)} input(s) added since this run started are skipped: {shown} "
                "(a resumed run does the inputs it started with; run them in a new run)"
            )
        return [listed.get(rel) or InputItem(path if is_url(path) else Path(path), rel) for rel, path in recorded]

    def _check_same(self, identity: dict, what: str) -> None:
        old = read_sidecar(self.out)
        if old is None:
            return  # no record (an older cvtool, or written by hand): trust the user's --resume
        differs = identity_difference(old, identity)
        if differs is None and old.get("shard") != identity.get("shard"):
            differs = f"shard ({_show(old.get('shard'))}, now {_show(identity.get('shard'))})"
        if differs is None and old.get("result_format", self.format.name) != self.format.name:
            # the errors journal is named after the format: resuming in another would drop its rows
            differs = f"results format ({old['result_format']}, now {self.format.name})"
        if differs is not None:
            raise UsageError(f"{what} was made with a different {differs}; pass --overwrite to start over")

    def write(self, row: Sequence) -> None:
        """One input's row; its first cell is the input's relative path."""
        self._rows.write([path_cell(row[0]), *row[1:]])
        self.processed += 1

    def write_group(self, rows: Sequence[Sequence]) -> None:
        """The rows of one input (``grouped`` jobs): several rows, one input processed."""
        for row in rows:
            self._rows.write([path_cell(row[0]), *row[1:]])
        self.processed += 1

    def fail(self, rel: str, reason: str) -> None:
        """One bad input: a row in the errors CSV and a warning line."""
        self._errs.write([path_cell(rel), reason])
        warn(f"{path_cell(rel)}: {reason}")
        self.failed += 1

    def fail_all(self, failures: Iterable) -> None:
        for f in failures:
            self.fail(f.item.rel, f.reason)

    def flush(self) -> None:
        """Call after each batch: what was written survives a kill -9 and is kept by --resume."""
        self._errs.flush()
        self._rows.flush()
        flushed(self.out)  # a remote --out (cvtool.storage): the partials are uploaded beside it

    def __enter__(self) -> BatchJob:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._close(exc_type is None)
        finally:
            self._lock.release()

    def _close(self, success: bool) -> None:
        if self._rows is None:
            return
        if success:
            self._errs.commit()
            self._rows.commit()
            self.inputs_record.unlink(missing_ok=True)
            return
        if not self.processed + self.failed:  # nothing done (e.g. the model failed on the first batch): no partial
            self._errs.discard()
            self._rows.discard()
            self.sidecar.unlink(missing_ok=True)
            self.inputs_record.unlink(missing_ok=True)
            return
        self._errs.close()
        self._rows.close()
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
