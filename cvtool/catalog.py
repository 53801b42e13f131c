"""`cvtool models`: what can be given as MODEL, listed without loading any model.

The ``imagenet:`` names come from :mod:`cvtool.imagenet`; run directories are
found by their ``cvtool.json`` under a folder, and described from it alone
(class names, input size, architecture, the best epoch's metrics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cvtool.errors import UnusableError, UsageError

# Metrics shown in the text listing, in this order, when a run has them.
SHOWN_METRICS = ("val_accuracy", "val_loss", "accuracy", "loss")
MAX_NAMES_SHOWN = 6


@dataclass
class Catalog:
    imagenet: list[dict]
    runs: list[dict]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (run directory, reason)


def find_runs(folder: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every run directory under ``folder`` (itself included), in path order, with what its cvtool.json says."""
    from cvtool.bundle import META_FILE, ensemble_manifest, read_meta

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"folder not found: {folder}")
    runs, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if META_FILE not in files:
            continue
        run_dir = Path(root)
        try:
            entry = ensemble_manifest(run_dir)
            if entry is not None:
                runs.append(describe_ensemble(run_dir, entry))
                continue  # its members are listed as runs of their own
            meta = read_meta(run_dir)
        except UnusableError as exc:
            skipped.append((str(run_dir), str(exc)))
            continue
        runs.append(describe_run(run_dir, meta))
        dirs[:] = [d for d in dirs if d not in ("checkpoints", "logs")]
    return runs, skipped


def describe_ensemble(run_dir: Path, entry: dict) -> dict:
    """An ensemble run (``train --members K``): its members and rule, read from the manifest."""
    import json

    from cvtool.bundle import META_FILE

    meta = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
    names = [str(c) for c in meta.get("class_names") or []]
    return {
        "model": str(run_dir),
        "arch": f"ensemble of {len(entry['members'])} ({entry.get('rule') or 'mean'})",
        "classes": len(names),
        "class_names": names,
        "image_size": [],
        "metrics": {},
        "saved": meta.get("saved", ""),
        "model_file_present": all((run_dir / m).is_dir() for m in entry["members"]),
    }


def describe_run(run_dir: Path, meta: dict) -> dict:
    model_file = run_dir / meta.get("model_file", "model.keras")
    return {
        "model": str(run_dir),
        "arch": meta.get("arch") or meta.get("backbone") or meta.get("task") or "",
        "classes": len(meta["class_names"]),
        "class_names": list(meta["class_names"]),
        "image_size": list(meta["image_size"]),
        "metrics": {k: v for k, v in (meta.get("metrics") or {}).items()},
        "saved": meta.get("saved", ""),
        "model_file_present": model_file.is_file(),
    }


def list_models(folder: str | os.PathLike | None = None) -> Catalog:
    """The ``imagenet:`` names, and the run directories under ``folder`` when one is given."""
    from cvtool import imagenet

    nets = [imagenet.describe(name) for name in imagenet.NAMES]
    runs, skipped = find_runs(folder) if folder is not None else ([], [])
    return Catalog(nets, runs, skipped)


def format_catalog(catalog: Catalog) -> str:
    """The text listing: one line per model, a header per kind."""
    lines = ["ImageNet classifiers (1000 classes; weights: Keras cache, --weights or $CVTOOL_IMAGENET_WEIGHTS):"]
    width = max(len(n["model"]) for n in catalog.imagenet)
    for n in catalog.imagenet:
        size = "x".join(str(s) for s in n["image_size"])
        lines.append(f"  {n['model']:<{width}}  {size:>7}  preprocess {n['preprocess']:<5}  {n['keras']}")
    if catalog.runs or catalog.skipped:
        lines.append("")
        lines.append("Run directories:")
    for r in catalog.runs:
        names = ", ".join(r["class_names"][:MAX_NAMES_SHOWN]) + (", ..." if r["classes"] > MAX_NAMES_SHOWN else "")
        metrics = "  ".join(f"{k} {r['metrics'][k]:.4f}" for k in SHOWN_METRICS if _is_number(r["metrics"].get(k)))
        size = "x".join(str(s) for s in r["image_size"]) or "-"
        missing = "" if r["model_file_present"] else "  (model file missing)"
        lines.append(f"  {r['model']}  {r['arch']}  {size}  {r['classes']} classes: {names}{missing}")
        if metrics:
            lines.append(f"      {metrics}")
    return "\n".join(lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
