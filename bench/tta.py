"""Benchmark: batched TTA (7 views) against plain predict and against the cookbook's per-image loop.

    python bench/tta.py [FOLDER] [--arch small-cnn|mobilenet_v2] [--image-size N] [--limit N]

FOLDER defaults to ../shared/datasets/clothing-small/validation when present, else
synthetic 400x533 JPEGs are written to a temporary folder. The model is built
untrained (weights=None; speed does not depend on the weights). All three ways
decode every image with the same loader; times are taken in the same run (after a
warm-up pass on a few images each; plain and tta alternate for --repeat rounds and the
best of each is kept), so the ratios hold on a loaded machine even when the absolute
times do not:

- plain: ``cvtool.predict.predict`` (one view per image);
- tta: ``cvtool.tta.tta`` with identity + hflip + 5 crops = 7 views, all views of a
  batch of images in one model call; target: at most 1.1 x 7 x plain;
- cookbook: one ``model.predict`` call per image on its 7 copies (views built the same way).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvtool.bundle import Classifier  # noqa: E402
from cvtool.images import list_images, open_rgb  # noqa: E402
from cvtool.predict import predict  # noqa: E402
from cvtool.tta import TtaOptions, TtaViews, tta  # noqa: E402

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small" / "validation"
SHARED = Path("/work/shared/datasets/clothing-small/validation")


def synthetic_folder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (533, 400, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i:04d}.jpg", quality=90)
    return root


def cookbook_loop(classifier: Classifier, items, options: TtaOptions) -> np.ndarray:
    """The cookbook's way: per image, build its copies and call model.predict on them."""
    views = TtaViews(options)
    out = []
    for item in items:
        img = open_rgb(item.path, classifier.image_size)
        copies = np.stack(views(img, classifier.image_size, np.random.default_rng(0))).astype("float32")
        out.append(classifier.model.predict(copies, verbose=0).mean(axis=0))
    return np.stack(out)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=None)
    parser.add_argument("--arch", default="small-cnn")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N images (0: all).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="Rounds of plain and tta (the best of each is kept).")
    args = parser.parse_args()

    import keras

    from cvtool.architectures import build_scratch
    from cvtool.backbones import default_image_size

    tmp = Path(tempfile.mkdtemp(prefix="cvtool-bench-tta-"))
    folder = args.folder or next((f for f in (DEFAULT_FOLDER, SHARED) if f.is_dir()), None)
    if folder is None:
        (tmp / "images").mkdir()
        folder = synthetic_folder(tmp / "images", 64)
    items = list_images(folder)
    if args.limit:
        items = items[: args.limit]
        subset = tmp / "subset"
        for item in items:
            (subset / item.rel).parent.mkdir(parents=True, exist_ok=True)
            (subset / item.rel).symlink_to(item.path.resolve())
        folder, items = subset, list_images(subset)
    side = args.image_size or default_image_size(args.arch)
    keras.utils.set_random_seed(0)
    model = build_scratch(args.arch, 10, (side, side))
    clf = Classifier(model, [f"c{i}" for i in range(10)], (side, side), source=args.arch)
    options = TtaOptions(("identity", "hflip", "crop"))
    n = len(items)
    print(f"{n} images from {folder}; {args.arch} at {side}px; 7 views (identity, hflip, 5 crops)", flush=True)

    warm = tmp / "warm"
    warm.mkdir()
    for item in items[:4]:
        (warm / Path(item.rel).name).symlink_to(item.path.resolve())
    predict(clf, warm, tmp / "w1.csv", batch_size=args.batch_size, quiet=True)
    tta(clf, warm, tmp / "w2.csv", options=options, batch_size=args.batch_size, quiet=True)
    cookbook_loop(clf, list_images(warm), options)

    # Alternate plain and tta rounds and keep each one's best: other jobs on a shared machine only add time.
    plains, ttas = [], []
    bs = args.batch_size
    for r in range(args.repeat):
        plains.append(timed(lambda r=r: predict(clf, folder, tmp / f"plain{r}.csv", batch_size=bs, quiet=True)))
        ttas.append(
            timed(lambda r=r: tta(clf, folder, tmp / f"tta{r}.csv", options=options, batch_size=bs, quiet=True))
        )
    t_plain, t_tta = min(plains), min(ttas)
    t_cook = timed(lambda: cookbook_loop(clf, items, options))
    print(f"rounds: plain {', '.join(f'{t:.2f}' for t in plains)} s; tta {', '.join(f'{t:.2f}' for t in ttas)} s")
    print(f"plain predict : {t_plain:8.2f} s  ({n / t_plain:7.1f} img/s)")
    print(f"tta, 7 views  : {t_tta:8.2f} s  ({n / t_tta:7.1f} img/s)")
    print(f"cookbook loop : {t_cook:8.2f} s  ({n / t_cook:7.1f} img/s)")
    ratio = t_tta / t_plain
    print(f"tta / plain   : {ratio:6.2f}  (target <= {1.1 * 7:.1f}: {'met' if ratio <= 7.7 else 'NOT met'})")
    print(f"cookbook / tta: {t_cook / t_tta:6.2f}  (batched TTA is this many times faster)")


if __name__ == "__main__":
    main()
