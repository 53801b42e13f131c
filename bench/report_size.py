"""Size and cost of evaluate's report.html on a large evaluation.

Builds N labelled JPEGs (10 colour classes, 160x120) and an untrained small-cnn run (so most
images are misclassified: the worst case for the error gallery), then runs `evaluate` twice in
this process: with the report (default --report-max 100) and with --no-report, the baseline.
Prints the page's total size (report.html + report_files/) and the time ratio.

    python report_size.py --images 10000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from common import Timer, machine
from PIL import Image


def make_data(root: Path, n: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 225, (classes, 3))
    for i in range(n):
        c = i % classes
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = np.clip(colours[c][None, None, :] + rng.normal(0, 40, (120, 160, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:06d}.jpg", quality=90)
    return root


def make_run(run: Path, classes: list[str]) -> Path:
    from cvtool.architectures import build_scratch
    from cvtool.bundle import save_model, write_meta

    model = build_scratch("small-cnn", len(classes), (64, 64))
    save_model(model, run / "model.keras")
    write_meta(run, {"task": "classification", "class_names": classes, "image_size": [64, 64], "arch": "small-cnn"})
    return run


def folder_size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        total += p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--report-max", type=int, default=100)
    args = parser.parse_args()
    from cvtool.evaluate import evaluate

    work = Path(tempfile.mkdtemp(prefix="cvtool-report-bench-"))
    try:
        data = make_data(work / "data", args.images)
        run = make_run(work / "run", sorted(p.name for p in data.iterdir()))
        evaluate(run, data, work / "warm", quiet=True, report=False)  # TF start-up, file cache
        with Timer() as plain:
            evaluate(run, data, work / "plain", quiet=True, report=False)
        with Timer() as full:
            result = evaluate(run, data, work / "full", quiet=True, report_max=args.report_max)
        out = work / "full"
        size = folder_size([out / "report.html", out / "report_files"])
        others = folder_size([out / "confusion_matrix.png", out / "confusion_matrix_normalized.png"])
        thumbs = len(list((out / "report_files" / "thumbs").iterdir()))
        print(f"machine: {machine()}")
        print(f"{args.images} images, accuracy {result.metrics['accuracy']:.3f}, --report-max {args.report_max}")
        print(
            f"report.html + report_files/: {size / 1e6:.2f} MB ({thumbs} thumbnails); confusion PNGs {others / 1e6:.2f} MB"
        )
        print(
            f"evaluate with report {full.seconds:.1f} s, --no-report {plain.seconds:.1f} s: ratio {full.seconds / plain.seconds:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
