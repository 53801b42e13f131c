"""`cvtool merge`: shard results (and their errors files) combined into one, in input order.

Shards may be CSV, JSON Lines or Parquet, mixed (:mod:`cvtool.formats`); the
merged file is written in the format of OUT (its suffix, or ``format``), its
errors file too. Each shard written by a batch command has a sidecar (``preds.job.json``,
see :mod:`cvtool.jobs`) that records the command, the model's fingerprint,
the columns and the shard. Merging refuses shards made by different models or
options, the same shard twice, an input present in two shards, and (unless
``partial``) a missing shard of K/N. Rows are streamed, so memory stays flat.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from pathlib import Path

from cvtool.errors import UnusableError, UsageError
from cvtool.formats import FORMATS, CsvWriter, result_format, stored_format
from cvtool.jobs import (
    ERRORS_HEADER,
    IDENTITY_KEYS,
    SIDECAR_FORMAT,
    RunResult,
    identity_difference,
    parse_shard,
    read_sidecar,
    sidecar_path,
)
from cvtool.locks import holds_output_lock
from cvtool.outputs import cell_path, check_writable, errors_path, write_json
from cvtool.storage import fetch_with_siblings, is_url, local_path, redact, remote_of, stages_output


def _rows(path: Path, format: type[CsvWriter], header: Sequence[str] | None, kind: int, source: int) -> Iterator[tuple]:
    """(input path, kind, source, row) for each row of ``path``, checking the file is in input order.

    Rows are read as CSV cell text whatever ``format`` the file is in. The input path is the path
    cell read back (:func:`cvtool.outputs.cell_path`): input order is the order of the file names,
    which an escaped cell need not keep.
    """
    reader = format.read(path)
    first = next(reader, None)
    if first is None and format.name == "jsonl":
        return  # an empty JSON Lines file: no rows, and no keys to check
    if first is None or (header is not None and first != list(header)):
        raise UnusableError(f"{path} does not have the columns its {sidecar_path(path).name} records")
    last = None
    for row in reader:
        key = cell_path(row[0])
        if last is not None and key < last:
            raise UnusableError(f"{path} is not in input order at {row[0]!r}; was it edited?")
        last = key
        yield key, kind, source, row


def _key(shard) -> str | Path:
    return redact(shard) if is_url(shard) else Path(shard).resolve()


def _companion_names(name: str) -> list[str]:
    """The file names that travel with a shard named ``name``: its errors file (in any format) and its sidecar."""
    return [*(errors_path(name, FORMATS.get(fmt).suffix).name for fmt in FORMATS), sidecar_path(name).name]


def _companions(shard) -> set:
    """A shard's companions (:func:`_companion_names`) as :func:`_key` gives them, for a path or a URL."""
    if is_url(shard):
        folder, name = str(shard).rsplit("/", 1)
        return {redact(f"{folder}/{n}") for n in _companion_names(name)}
    shard = Path(shard)
    return {(shard.parent / n).resolve() for n in _companion_names(shard.name)}


def _family(url: str) -> set[str]:
    """A shard or output URL with its errors CSV and job file, without secrets."""
    folder, name = url.rsplit("/", 1)
    return {redact(f"{folder}/{n}") for n in (name, *_companion_names(name))}


def _fetch_shard(url: str, out) -> Path:
    """A shard URL's local copy, with its errors CSV and job file beside it (:mod:`cvtool.storage`)."""
    if is_url(out) and _family(str(out)) & _family(url):
        raise UsageError(
            f"{redact(out)} would overwrite {redact(url)} or its errors/job files; write the merge to another file"
        )
    name = url.rsplit("/", 1)[1]
    siblings = _companion_names(name)
    local = fetch_with_siblings(url, siblings)
    recorded = (read_sidecar(local) or {}).get("errors")
    if isinstance(recorded, str) and recorded and "/" not in recorded and recorded not in siblings:
        local = fetch_with_siblings(url, [*siblings, recorded])  # gradcam, segment: DIR/errors.csv
    return local


@stages_output("out")
@holds_output_lock("out")
def merge(
    out: str | Path,
    shards: Sequence[str | Path],
    *,
    overwrite: bool = False,
    partial: bool = False,
    format: str | None = None,
) -> RunResult:
    """Write ``out`` and its errors file from ``shards``; rows sorted by path as ``list_images`` orders them.

    ``out`` comes first, as on the command line (``cvtool merge OUT SHARD...``).

    Args:
        out: the combined file to write (its errors file and sidecar go beside it).
        shards: the shard files, CSV, JSON Lines or Parquet (their errors files travel with them;
            naming them too is harmless).
        overwrite: replace an existing ``out``.
        partial: merge even if some shards of K/N are missing.
        format: ``csv``, ``jsonl`` or ``parquet``; default: from ``out``'s suffix.

    Example: ``merge("preds.csv", sorted(Path("parts").glob("part-*.csv")))``.
    """
    out = Path(out)
    out_shown = remote_of(out)  # a remote OUT is written through a local staging copy (cvtool.storage)
    out_format = result_format(out, format)
    err_out = errors_path(out, out_format.suffix)
    given = [local_path(str(s)) if isinstance(s, str) else s for s in shards]
    # A shell glob such as part-* also matches each shard's errors file and sidecar: those travel with their shard.
    companions = {c for s in given for c in _companions(s)}
    given = [s for s in given if _key(s) not in companions]
    if not given:
        raise UsageError("give at least one shard file to merge")
    shown: dict[Path, str] = {}  # local copy -> the shard as given (a URL's copy lies in the cache)
    shards = []
    for s in given:
        local = _fetch_shard(s, out_shown) if is_url(s) else Path(s)
        shown[local] = redact(str(s))
        shards.append(local)
    metas = []
    for shard in shards:
        if not shard.is_file():
            raise UsageError(f"shard file not found: {shown[shard]}")
        written = {p.resolve() for p in (out, err_out, sidecar_path(out))}
        if written & {shard.resolve(), *_companions(shard)}:
            raise UsageError(
                f"{out_shown} would overwrite {shown[shard]} or its errors/job files; write the merge to another file"
            )
        meta = read_sidecar(shard)
        if meta is None or meta.get("format") != SIDECAR_FORMAT or not isinstance(meta.get("header"), list):
            raise UnusableError(
                f"{shown[shard]} has no readable {sidecar_path(shard).name} beside it; only results written by cvtool "
                "(with the sidecar that records the model) can be merged"
            )
        metas.append(meta)
    first = metas[0]
    for shard, meta in zip(shards[1:], metas[1:]):
        differs = identity_difference(first, meta)
        if differs is not None:
            raise UnusableError(
                f"{shown[shard]} was made with a different {differs} than {shown[shards[0]]}; refusing to merge"
            )
    _check_shard_set(shards, metas, partial)
    check_writable(out, overwrite)
    check_writable(err_out, True)
    streams = []
    for n, (shard, meta) in enumerate(zip(shards, metas)):
        fmt = stored_format(shard, meta.get("result_format"))
        streams.append(_rows(shard, fmt, first["header"], 0, n))
        errs = shard_errors(shard, meta)
        if errs.exists():
            streams.append(_rows(errs, stored_format(errs, meta.get("result_format")), ERRORS_HEADER, 1, n))
    processed = failed = 0
    with out_format(out, first["header"]) as rows, out_format(err_out, ERRORS_HEADER) as errors:
        previous = None  # (path, kind, shard) of the last row: an input's several rows come from one shard's CSV
        for key, kind, source, row in heapq.merge(*streams, key=lambda t: t[0]):
            if previous is not None and key == previous[0] and (kind, source) != previous[1:]:
                raise UnusableError(f"{key!r} appears in more than one shard; refusing to merge duplicates")
            same_input = previous is not None and key == previous[0]
            previous = (key, kind, source)
            if kind == 0:
                rows.write(row)
                processed += 0 if same_input else 1
            else:
                errors.write(row)
                failed += 1
    write_json(
        sidecar_path(out),
        {
            "format": SIDECAR_FORMAT,
            **{key: first.get(key) for key in IDENTITY_KEYS},
            "shard": None,
            "grouped": bool(first.get("grouped")),
            "result_format": out_format.name,
            "merged_from": [shown.get(s, str(s)) for s in shards],
            "inputs": processed + failed,
            "cvtool": first.get("cvtool"),
        },
    )
    return RunResult(processed, failed, out, err_out)


def shard_errors(shard: Path, meta: dict) -> Path:
    """The errors file of a shard: as its sidecar records (``DIR/errors.csv`` for gradcam, segment), else beside it."""
    name = meta.get("errors")
    if isinstance(name, str) and name:
        path = Path(name)
        return path if path.is_absolute() else shard.parent / path
    return errors_path(shard, stored_format(shard, meta.get("result_format")).suffix)


def _check_shard_set(shards: list[Path], metas: list[dict], partial: bool) -> None:
    seen: dict[str, Path] = {}
    counts = set()
    for shard, meta in zip(shards, metas):
        spec = meta.get("shard")
        if spec is None:
            continue
        if spec in seen:
            raise UnusableError(f"{shard} and {seen[spec]} are both shard {spec}; refusing to merge duplicates")
        seen[spec] = shard
        counts.add(parse_shard(spec).count)
    if len(counts) > 1:
        raise UnusableError(f"the shards split the input in different ways ({', '.join(sorted(seen))})")
    if counts and not partial:
        n = counts.pop()
        missing = [f"{k}/{n}" for k in range(n) if f"{k}/{n}" not in seen]
        if missing:
            raise UnusableError(f"shard {', '.join(missing)} missing; give every shard, or pass --partial")
