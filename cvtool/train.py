"""`cvtool train`: a classifier trained from scratch into a run directory."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import cvtool.runtime  # noqa: F401 - quiet TensorFlow import
from cvtool.augment import AugmentConfig, build_augmenter
from cvtool.batches import Failure
from cvtool.bundle import META_FILE, MODEL_FILE, save_model, write_meta
from cvtool.errors import UnusableError, UsageError
from cvtool.outputs import write_csv
from cvtool.progress import info, warn

OPTIMIZERS = ("adam", "rmsprop", "sgd")
HISTORY_FILE = "history.csv"
ERRORS_FILE = "errors.csv"


@dataclass
class TrainConfig:
    """Everything that decides how a model is trained; stored in cvtool.json."""

    arch: str = "small-cnn"
    epochs: int = 10
    image_size: int | None = None  # square side; None: the architecture's default
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 42
    val_split: float = 0.2
    label_smoothing: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    failures: list[Failure]


def make_optimizer(name: str, lr: float):
    import keras

    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)
    raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def prepare_run_dir(out: str | Path, overwrite: bool) -> Path:
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a folder for the run")
    if (run_dir / MODEL_FILE).exists() or (run_dir / META_FILE).exists():
        if not overwrite:
            raise UsageError(f"{run_dir} already holds a trained model; pass --overwrite to replace it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def validate(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if cfg.lr <= 0:
        raise UsageError("--lr must be positive")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UsageError("--image-size must be at least 8")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise UsageError("--label-smoothing must be in [0, 1)")
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


def train(
    data: str | Path, out: str | Path, cfg: TrainConfig | None = None, overwrite: bool = False, quiet: bool = False
) -> TrainResult:
    """Train ``cfg.arch`` on the labelled folder ``data``; write the run directory ``out``."""
    cfg = cfg or TrainConfig()
    validate(cfg)
    from cvtool.data import decode_set, discover, training_dataset
    from cvtool.models import build_scratch, default_image_size

    splits = discover(data, cfg.val_split, cfg.seed)
    run_dir = prepare_run_dir(out, overwrite)
    side = cfg.image_size or default_image_size(cfg.arch)
    image_size = (side, side)

    import keras

    keras.utils.set_random_seed(cfg.seed)
    info(
        f"training {cfg.arch} at {side}x{side} on {len(splits.train)} images, validating on "
        f"{len(splits.validation)}; classes: {', '.join(splits.class_names)}",
        quiet,
    )
    train_set = decode_set(splits.train, image_size, "decoding train", quiet, cache_dir=run_dir)
    val_set = decode_set(splits.validation, image_size, "decoding validation", quiet, cache_dir=run_dir)
    failures = train_set.failures + val_set.failures
    write_csv(run_dir / ERRORS_FILE, ["path", "error"], ((f.item.rel, f.reason) for f in failures))
    for f in failures:
        warn(f"skipped {f.item.rel}: {f.reason}")
    if len(train_set.labels) == 0:
        raise UnusableError(f"no readable training images in {data}")

    num_classes = len(splits.class_names)
    model = build_scratch(cfg.arch, num_classes, image_size)
    model.compile(
        optimizer=make_optimizer(cfg.optimizer, cfg.lr),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    augmenter = build_augmenter(cfg.augment, image_size, cfg.seed)
    train_ds = training_dataset(train_set, cfg.batch_size, True, cfg.seed, augmenter, num_classes)
    has_val = len(val_set.labels) > 0
    val_ds = training_dataset(val_set, cfg.batch_size, False, cfg.seed, None, num_classes) if has_val else None
    monitor = "val_loss" if has_val else "loss"

    best = BestModelSaver(run_dir / MODEL_FILE, monitor)
    calibration = training_dataset(train_set, cfg.batch_size, True, cfg.seed + 1, None, num_classes)
    callbacks = [
        RecalibrateBatchNorm(calibration, steps_per_epoch=math.ceil(len(train_set.labels) / cfg.batch_size)),
        best,
        HistoryWriter(run_dir),
        EpochLogger(cfg.epochs, quiet),
    ]
    model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks, verbose=0, shuffle=False)

    metrics = {
        "monitor": monitor,
        "best_epoch": best.best_epoch,
        **{k: float(v) for k, v in best.best_logs.items()},
    }
    meta = {
        "task": "classification",
        "model_file": MODEL_FILE,
        "class_names": splits.class_names,
        "image_size": list(image_size),
        "input": {"color": "RGB", "range": [0, 255], "resize": "bilinear", "exif_orientation": "applied"},
        "preprocessing": "built into the model",
        "arch": cfg.arch,
        "backbone": None if cfg.arch == "small-cnn" else cfg.arch,
        "config": cfg.to_dict(),
        "data": {
            "root": str(Path(data).resolve()),
            "layout": splits.layout,
            "train": int(len(train_set.labels)),
            "validation": int(len(val_set.labels)),
            "skipped": len(failures),
        },
        "metrics": metrics,
    }
    write_meta(run_dir, meta)
    plot_history(run_dir)
    info(f"best epoch {best.best_epoch}: " + _format_logs(best.best_logs) + f"; saved {run_dir}", quiet)
    return TrainResult(run_dir, metrics, failures)


def _format_logs(logs: dict) -> str:
    return " ".join(f"{k} {float(v):.4f}" for k, v in logs.items())


def _callback_base():
    import keras

    return keras.callbacks.Callback


class RecalibrateBatchNorm(_callback_base()):
    """Precise BatchNorm: re-estimate BN moving statistics at the end of every epoch.

    Moving averages lag behind fast-changing weights, and on small data sets
    (a few steps per epoch) they make validation accuracy sit at chance while
    training accuracy climbs. Before validation runs, this averages the batch
    statistics of up to ``max_batches`` un-augmented training batches under the
    current weights. Frozen BN layers (trainable=False) are left alone.
    """

    def __init__(self, dataset, steps_per_epoch: int, max_batches: int = 16):
        super().__init__()
        self.dataset, self.steps, self.max_batches = dataset, steps_per_epoch, max_batches

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.steps:
            self.recalibrate()

    def recalibrate(self) -> None:
        from keras import layers

        from cvtool.models import all_layers

        bns = [
            layer
            for layer in all_layers(self.model)
            if isinstance(layer, layers.BatchNormalization) and layer.trainable
        ]
        if not bns:
            return
        saved = [layer.momentum for layer in bns]
        try:
            for i, (x, _) in enumerate(self.dataset.take(self.max_batches)):
                for layer in bns:
                    layer.momentum = i / (i + 1)  # cumulative mean of the batch statistics
                self.model(x, training=True)
        finally:
            for layer, momentum in zip(bns, saved):
                layer.momentum = momentum


class BestModelSaver(_callback_base()):
    """Saves the model atomically to ``path`` whenever ``monitor`` improves (lower for losses)."""

    def __init__(self, path: Path, monitor: str):
        super().__init__()
        self.path, self.monitor = path, monitor
        self.higher_is_better = "acc" in monitor
        self.best = -math.inf if self.higher_is_better else math.inf
        self.best_epoch = 0
        self.best_logs: dict = {}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        better = value > self.best if self.higher_is_better else value < self.best
        if better or self.best_epoch == 0:
            self.best, self.best_epoch = float(value), epoch + 1
            self.best_logs = {k: float(v) for k, v in logs.items() if np.isscalar(v)}
            save_model(self.model, self.path)


class HistoryWriter(_callback_base()):
    """Rewrites ``history.csv`` (one row per epoch) after every epoch."""

    def __init__(self, run_dir: Path, extra: dict | None = None):
        super().__init__()
        self.run_dir, self.rows, self.extra = run_dir, [], extra or {}
        self._start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **self.extra}
        row.update({k: float(v) for k, v in (logs or {}).items() if np.isscalar(v)})
        row["seconds"] = round(time.monotonic() - self._start, 3)
        self.rows.append(row)
        header = list(dict.fromkeys(k for r in self.rows for k in r))
        write_csv(self.run_dir / HISTORY_FILE, header, ([r.get(k, "") for k in header] for r in self.rows))


class EpochLogger(_callback_base()):
    """One line per epoch on stderr (Keras' own bar is off: it floods cron logs)."""

    def __init__(self, epochs: int, quiet: bool):
        super().__init__()
        self.epochs, self.quiet = epochs, quiet
        self._start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if not self.quiet:
            took = time.monotonic() - self._start
            print(
                f"epoch {epoch + 1}/{self.epochs}: {_format_logs(logs or {})} ({took:.1f}s)",
                file=sys.stderr,
                flush=True,
            )


def plot_history(run_dir: Path) -> Path | None:
    """history.png: loss and accuracy curves, train and validation."""
    import csv

    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cvtool.outputs import save_figure

    epochs = list(range(1, len(rows) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]
            if not all(np.isnan(values)):
                ax.plot(epochs, values, style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    out = save_figure(fig, Path(run_dir) / "history.png")
    plt.close(fig)
    return out
