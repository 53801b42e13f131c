"""predict throughput against the forward-only limit and Keras' own folder pipeline.

    python bench/predict_speed.py [FOLDER] [--repeat 2]

Same model (MobileNetV2, 224 px, weights=None), same process, same images:
  forward-only   model on images already decoded and resized, in memory (the ceiling)
  keras-idfd     keras.utils.image_dataset_from_directory + model.predict
  per-image      the cookbook loop: load_img + img_to_array + predict, one image at a time
  cvtool         cvtool.predict.predict (bad-file reporting on, CSV written)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import Timer, default_folder, machine, mobilenet_run, row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=default_folder())
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per method (best is kept)")
    parser.add_argument("--per-image-limit", type=int, default=60, help="images for the slow per-image loop")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    import cvtool.runtime  # noqa: F401
    from cvtool.bundle import load_classifier
    from cvtool.images import list_images, load_image
    from cvtool.predict import predict

    items = list_images(args.folder)
    n = len(items)
    class_names = sorted({i.rel.split("/")[0] for i in items}) if "/" in items[0].rel else ["a", "b"]
    tmp = Path(tempfile.mkdtemp(prefix="cvtool-bench-"))
    run = mobilenet_run(tmp / "run", class_names)
    clf = load_classifier(run)
    print(f"# predict_speed on {machine()}: {n} images from {args.folder}")

    def best(fn):
        times = []
        for _ in range(args.repeat):
            with Timer() as t:
                fn()
            times.append(t.seconds)
        return min(times)

    # Warm-up: trace the forward function once at batch 32 and at the tail size.
    clf.predict(np.zeros((32, 224, 224, 3), np.uint8))
    clf.predict(np.zeros((n % 32 or 32, 224, 224, 3), np.uint8))

    decoded = np.stack([load_image(i.path, (224, 224)) for i in items])
    forward = best(lambda: [clf.predict(decoded[i : i + 32]) for i in range(0, n, 32)])
    forward_rate = n / forward
    row("forward-only (in-memory tensors)", forward_rate, "img/s")

    ds = keras.utils.image_dataset_from_directory(
        args.folder, labels=None, image_size=(224, 224), batch_size=32, shuffle=False, verbose=False
    )
    clf.model.predict(ds.take(1), verbose=0)
    idfd = best(lambda: clf.model.predict(ds, verbose=0))
    idfd_rate = n / idfd
    row("keras image_dataset_from_directory + predict", idfd_rate, "img/s", "forward-only", forward_rate)

    subset = items[: args.per_image_limit]

    def per_image():
        for item in subset:
            img = keras.utils.load_img(item.path, target_size=(224, 224))
            clf.model.predict(np.expand_dims(keras.utils.img_to_array(img), 0), verbose=0)

    per_image_rate = len(subset) / best(per_image)
    row("per-image load_img + predict loop", per_image_rate, "img/s", "forward-only", forward_rate)

    out = tmp / "preds.csv"
    cv = best(lambda: predict(clf, args.folder, out, overwrite=True, quiet=True))
    cv_rate = n / cv
    row("cvtool predict", cv_rate, "img/s", "forward-only", forward_rate)
    print(f"cvtool predict vs forward-only: {cv_rate / forward_rate:.2f}x (target >= 0.90)")
    print(f"cvtool predict vs image_dataset_from_directory: {cv_rate / idfd_rate:.2f}x (target >= 1.20)")
    print(f"cvtool predict vs per-image loop: {cv_rate / per_image_rate:.2f}x")
    del tf


if __name__ == "__main__":
    main()
