"""Large photos: predict on 12-megapixel JPEGs, with DCT-scaled decoding against full decoding.

    python bench/large_photos.py [FOLDER] [--limit 120] [--run RUN]

Makes 4000x3000 JPEG copies of the photos in FOLDER (once, in a temp folder), then times
  keras-idfd      image_dataset_from_directory + model.predict (full decode, TF resize)
  cvtool full     cvtool predict with CVTOOL_JPEG_DRAFT=0 (full decode)
  cvtool          cvtool predict (libjpeg DCT scaling to >= the model's input size)
with MobileNetV2 at 224 px. With --run (a classifier run directory trained on FOLDER's classes,
e.g. small-cnn on clothing-small), it also reports accuracy on the 12 MP copies with and without
DCT scaling, and on the original photos.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

from common import Timer, default_folder, machine, mobilenet_run, row
from PIL import Image


def make_large(folder: Path, dst: Path, limit: int) -> Path:
    from cvtool.images import list_images

    items = list_images(folder)
    step = max(1, len(items) // limit)
    for item in items[::step][:limit]:
        out = dst / item.rel
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(item.path) as im:
            im.convert("RGB").resize((3000, 4000) if im.height > im.width else (4000, 3000), Image.BICUBIC).save(
                out, quality=90
            )
    return dst


def accuracy(csv_path: Path) -> float:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return sum(r["label"] == r["path"].split("/")[0] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=default_folder())
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--run", type=Path, help="trained run directory for the accuracy check")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cvtool-bench-12mp")
    args = parser.parse_args()

    import keras

    import cvtool.runtime  # noqa: F401
    from cvtool.bundle import load_classifier
    from cvtool.images import list_images
    from cvtool.predict import predict

    large = make_large(args.folder, args.cache, args.limit)
    n = len(list_images(large))
    print(f"# large_photos on {machine()}: {n} JPEGs of 12 MP in {large}")
    classes = sorted(p.name for p in large.iterdir() if p.is_dir())
    tmp = Path(tempfile.mkdtemp(prefix="cvtool-bench-large-"))
    clf = load_classifier(mobilenet_run(tmp / "run", classes))

    ds = keras.utils.image_dataset_from_directory(
        large, labels=None, image_size=(224, 224), batch_size=32, shuffle=False, verbose=False
    )
    clf.model.predict(ds.take(1), verbose=0)
    with Timer() as t:
        clf.model.predict(ds, verbose=0)
    idfd = n / t.seconds
    row("keras image_dataset_from_directory + predict", idfd, "img/s")

    predict(clf, large, tmp / "warm.csv", overwrite=True, quiet=True)
    os.environ["CVTOOL_JPEG_DRAFT"] = "0"
    with Timer() as t:
        predict(clf, large, tmp / "full.csv", overwrite=True, quiet=True)
    row("cvtool predict, full JPEG decode", n / t.seconds, "img/s", "idfd", idfd)
    os.environ["CVTOOL_JPEG_DRAFT"] = "1"
    with Timer() as t:
        predict(clf, large, tmp / "draft.csv", overwrite=True, quiet=True)
    rate = n / t.seconds
    row("cvtool predict, DCT-scaled decode", rate, "img/s", "idfd", idfd)
    print(f"cvtool predict on 12 MP JPEGs vs image_dataset_from_directory: {rate / idfd:.2f}x (target >= 3)")

    if args.run:
        trained = load_classifier(args.run)
        os.environ["CVTOOL_JPEG_DRAFT"] = "0"
        predict(trained, large, tmp / "acc_full.csv", overwrite=True, quiet=True)
        os.environ["CVTOOL_JPEG_DRAFT"] = "1"
        predict(trained, large, tmp / "acc_draft.csv", overwrite=True, quiet=True)
        originals = tmp / "orig"
        for item in list_images(large):
            (originals / item.rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((args.folder / item.rel).resolve(), originals / item.rel)
        predict(trained, originals, tmp / "acc_orig.csv", overwrite=True, quiet=True)
        full, draft, orig = (accuracy(tmp / f"acc_{k}.csv") for k in ("full", "draft", "orig"))
        print(
            f"accuracy on 12 MP copies: full decode {full:.4f}, DCT-scaled {draft:.4f} "
            f"(difference {100 * (draft - full):+.2f} points); original photos {orig:.4f}"
        )


if __name__ == "__main__":
    main()
