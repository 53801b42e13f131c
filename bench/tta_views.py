"""Benchmark: which TTA views help, measured on validation photos with default-recipe models.

    python bench/tta_views.py RUN [RUN...] [--data FOLDER]

Each RUN is a run directory (train it with the default recipe first:
``cvtool train ../shared/datasets/clothing-small --out runs/seed42 --seed 42``).
Every view of every transform is computed once per image (13 views: identity, hflip,
vflip, rot90, 5 crops, 2 scale crops, 2 brightness copies, built exactly as ``cvtool tta``
builds them, JPEGs decoded at predict's draft scale), then the accuracy of each set of
views (mean of their probabilities) is read off the same forward passes: identity alone
(= predict), identity plus each transform alone, the default set, and all views.
Prints one table: rows are view sets, columns are runs, plus the mean gain over identity.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvtool.bundle import load_classifier  # noqa: E402
from cvtool.data import read_class_folders  # noqa: E402
from cvtool.images import open_rgb  # noqa: E402
from cvtool.tta import DEFAULT_TRANSFORMS, TtaOptions, TtaViews, view_counts  # noqa: E402

DATA = Path("/work/shared/datasets/clothing-small/validation")
ALL = ("identity", "hflip", "vflip", "rot90", "crop", "scale", "brightness")


def view_probs(run: Path, data: Path, batch: int = 32) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Probabilities [images, views, classes], true labels, the transform of each view, seconds."""
    clf = load_classifier(run)
    _, labelled = read_class_folders(data, clf.class_names)
    options = TtaOptions(transforms=ALL)
    views = TtaViews(options)
    names = [t for t, n in view_counts(options).items() for _ in range(n)]
    out, start = [], time.perf_counter()
    items = labelled.items
    for i in range(0, len(items), batch):
        stack = []
        for item in items[i : i + batch]:
            # Seeded as cvtool.scoring.Scorer.decode seeds each image, so the random views equal `cvtool tta`'s.
            rng = np.random.default_rng([options.seed, zlib.crc32(item.rel.encode("utf-8"))])
            img = open_rgb(item.path, clf.image_size)
            stack.append(np.stack(views(img, clf.image_size, rng)))
        arr = np.stack(stack)  # [b, views, h, w, 3]
        b, v = arr.shape[:2]
        probs = clf.predict(arr.reshape(b * v, *arr.shape[2:]).astype(np.float32))
        out.append(probs.reshape(b, v, -1))
    return np.concatenate(out), np.asarray(labelled.labels), names, time.perf_counter() - start


def accuracy(probs: np.ndarray, labels: np.ndarray, names: list[str], chosen: tuple[str, ...]) -> float:
    idx = [i for i, n in enumerate(names) if n in chosen]
    return float((probs[:, idx].mean(axis=1).argmax(axis=1) == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    sets = {"identity (predict)": ("identity",)}
    for t in ALL[1:]:
        sets[f"identity+{t}"] = ("identity", t)
    sets[f"default ({'+'.join(DEFAULT_TRANSFORMS)})"] = DEFAULT_TRANSFORMS
    sets["identity+hflip+crop (the old default)"] = ("identity", "hflip", "crop")
    sets["identity+hflip+crop+scale"] = ("identity", "hflip", "crop", "scale")
    sets["all 13 views"] = ALL
    table: dict[str, list[float]] = {k: [] for k in sets}
    for run in args.runs:
        probs, labels, names, secs = view_probs(run, args.data)
        print(f"{run}: {len(labels)} images, 13 views each, {secs:.1f} s", flush=True)
        for key, chosen in sets.items():
            table[key].append(accuracy(probs, labels, names, chosen))
    base = np.array(table["identity (predict)"])
    print(f"\n| views | {' | '.join(r.name for r in args.runs)} | mean gain over identity |")
    print("| --- |" + " --- |" * (len(args.runs) + 1))
    for key, accs in table.items():
        gain = (np.array(accs) - base).mean() * 100
        print(f"| {key} | {' | '.join(f'{a:.1%}' for a in accs)} | {gain:+.1f} pts |")


if __name__ == "__main__":
    main()
