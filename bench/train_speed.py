"""Training epoch time: cvtool train against fit on an in-memory tensor dataset and ImageDataGenerator.

    python bench/train_speed.py [DATA] [--epochs 3] [--size 64]

Same model (small-cnn), same images, same batch size; the first epoch (tracing) is
excluded from every figure:
  in-memory      model.fit on tf.data.Dataset.from_tensor_slices(decoded arrays).cache(), validating each
                 epoch on in-memory arrays (the ceiling)
  cvtool         cvtool.train.train (decode-once cache, tf.data, precise BN), --no-hflip for a like-for-like
                 figure and with its default augmentation
  datagen        the seeds' loop: tf_keras ImageDataGenerator(rescale).flow_from_directory + fit
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CLOTHING, REPO, machine, row


class EpochTimes:
    def __init__(self):
        self.times = []

    def callback(self):
        import keras

        outer = self

        class CB(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                outer.times.append(time.perf_counter() - self.t)

        return CB()

    @property
    def steady(self) -> float:
        return float(np.mean(self.times[1:] if len(self.times) > 1 else self.times))


def main() -> None:
    parser = argparse.ArgumentParser()
    default = CLOTHING if CLOTHING.exists() else REPO / "samples" / "clothing"
    parser.add_argument("data", nargs="?", type=Path, default=default)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    import cvtool.runtime  # noqa: F401
    from cvtool.architectures import small_cnn
    from cvtool.config import AugmentConfig, TrainConfig
    from cvtool.data import decode_set, discover
    from cvtool.train import train

    size = (args.size, args.size)
    splits = discover(args.data)
    print(f"# train_speed on {machine()}: {len(splits.train)} training images from {args.data}, {args.size} px")
    t0 = time.perf_counter()
    train_set = decode_set(splits.train, size, quiet=True)
    val_set = decode_set(splits.validation, size, quiet=True)
    print(f"decode-once cache: {time.perf_counter() - t0:.1f} s for {len(train_set.labels)} images")
    n_classes = len(splits.class_names)

    def compiled():
        keras.utils.set_random_seed(0)
        model = small_cnn(n_classes, size)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        return model

    # Ceiling: arrays already in memory as tensors.
    x = tf.constant(train_set.images.astype(np.float32))
    y = tf.constant(train_set.labels)
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .cache()
        .shuffle(len(y))
        .batch(args.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    timing = EpochTimes()
    # Validation each epoch, as cvtool train does (its epoch time includes it).
    val = (val_set.images.astype(np.float32), val_set.labels)
    compiled().fit(
        ds,
        epochs=args.epochs,
        verbose=0,
        callbacks=[timing.callback()],
        validation_data=val,
        batch_size=args.batch_size,
    )
    base = timing.steady
    row("fit on in-memory tensors, s/epoch", base, "s")

    results = {}
    for label, hflip in (("cvtool train --no-hflip", False), ("cvtool train (default hflip)", True)):
        out = Path(tempfile.mkdtemp(prefix="cvtool-bench-train-"))
        cfg = TrainConfig(
            epochs=args.epochs, image_size=args.size, batch_size=args.batch_size, augment=AugmentConfig(hflip=hflip)
        )
        train(args.data, out / "run", cfg=cfg, quiet=True)
        with open(out / "run" / "history.csv", newline="") as f:
            secs = [float(r["seconds"]) for r in csv.DictReader(f)]
        results[label] = float(np.mean(secs[1:] if len(secs) > 1 else secs))
        row(f"{label}, s/epoch", results[label], "s", "in-memory", base)

    try:
        from tf_keras.preprocessing.image import ImageDataGenerator
    except ImportError:
        ImageDataGenerator = None
    if ImageDataGenerator is not None:
        train_dir = args.data / "train" if (args.data / "train").exists() else args.data
        flow = ImageDataGenerator().flow_from_directory(
            train_dir, target_size=size, batch_size=args.batch_size, class_mode="sparse", shuffle=True
        )

        def gen():
            while True:
                xb, yb = next(flow)
                yield xb, yb

        steps = int(np.ceil(flow.samples / args.batch_size))
        timing = EpochTimes()
        compiled().fit(gen(), steps_per_epoch=steps, epochs=args.epochs, verbose=0, callbacks=[timing.callback()])
        row("ImageDataGenerator.flow_from_directory + fit, s/epoch", timing.steady, "s", "in-memory", base)
        print(
            f"cvtool train vs ImageDataGenerator: {timing.steady / results['cvtool train (default hflip)']:.2f}x faster"
        )
    print(
        f"cvtool train (no aug) epoch time / in-memory fit: {results['cvtool train --no-hflip'] / base:.2f} (target <= 1.15)"
    )


if __name__ == "__main__":
    main()
