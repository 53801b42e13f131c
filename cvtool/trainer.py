"""The trainer: one engine under `cvtool train`, `cvtool finetune` and `train --members`.

A run goes through :func:`open_run` (a new run folder, or the stored config and
resume point of an interrupted one), :func:`load_data` (splits decoded once,
errors.csv, class weights), :class:`Trainer` (epochs with every callback, in
either loop, one set of callbacks for finetune's two phases) and
:func:`write_run_meta` (cvtool.json, history.png). The commands only choose the
model and the phases.

Example::

    run, cfg, state = open_run("runs/a", TrainConfig(epochs=3), cls=TrainConfig, kind="train")
    with run:
        data = load_data("photos/", cfg, run_dir=run.path, side=64, exclude=run.target)
        trainer = Trainer(run, cfg, data, kind="train", quiet=False, strategy=distribution_strategy())
        trainer.compile(model, cfg.lr)
        trainer.fit(model, cfg.epochs)
        trainer.publish()
        write_run_meta(trainer, "photos/", {"arch": cfg.arch}, mixed=False)
    result = trainer.result(model)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cvtool.runtime  # noqa: F401 - quiet TensorFlow import
from cvtool.augment import build_augmenter, build_mixer, validate_augment
from cvtool.batches import Failure
from cvtool.bundle import HUB_DIR, META_FILE, MODEL_FILE, write_meta
from cvtool.callbacks import (
    CHECKPOINT_DIR,
    CHECKPOINT_POLICIES,
    HISTORY_FILE,
    LOG_DIR,
    MONITORS,
    BestModelSaver,
    Checkpointer,
    EarlyStopper,
    EpochLogger,
    HistoryWriter,
    LearningRateSchedule,
    MonitorTracker,
    RecalibrateBatchNorm,
    ResumePoint,
    ValidationScores,
    acting_on,
    format_logs,
    read_resume_point,
    tensorboard,
)
from cvtool.config import LR_SCHEDULES, TrainConfig
from cvtool.data import LAYOUTS
from cvtool.errors import UnusableError, UsageError
from cvtool.outputs import path_cell, write_csv
from cvtool.progress import info, warn
from cvtool.report import FILES_DIR, PAGE_FILE
from cvtool.runtime import keras
from cvtool.storage import fetch, is_url, redact

OPTIMIZERS = ("adam", "rmsprop", "sgd")
LOOPS = ("fit", "custom")
CLASS_WEIGHTS = ("none", "balanced")
ERRORS_FILE = "errors.csv"


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    failures: list[Failure]
    model: object = None  # the trained Keras model (best weights restored when early stopping)


def make_optimizer(name: str, lr: float):
    from cvtool.runtime import keras

    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)
    raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def make_loss(label_smoothing: float = 0.0):
    """Categorical cross-entropy on one-hot labels; targets become y * (1 - a) + a / classes."""
    from cvtool.runtime import keras

    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


# What a run directory holds (cvtool's own files): replaced together by --overwrite; anything else is kept.
RUN_ENTRIES = (
    MODEL_FILE,
    META_FILE,
    HISTORY_FILE,
    "history.png",
    ERRORS_FILE,
    CHECKPOINT_DIR,
    LOG_DIR,
    HUB_DIR,
    PAGE_FILE,
    FILES_DIR,
)


class RunFolder:
    """Where a run is written: ``target`` itself, or beside it while it replaces a run there.

    ``--overwrite`` builds the new run aside, in a hidden sibling folder, and
    :meth:`publish` moves it into ``target`` once it has saved its first epoch:
    a new run that fails before that (bad data, unusable weights, an error in
    the first epoch, Ctrl-C) leaves the old run exactly as it was. Used as a
    context manager, a failure before publishing removes the folder built aside.

    Example: ``with RunFolder(Path("runs/a"), staged=True) as run: ... run.publish()``.
    """

    def __init__(self, target: Path, staged: bool = False):
        self.target = Path(target)
        resolved = self.target.resolve()
        self._replaced = resolved.parent / f".{resolved.name}.cvtool-old"  # the old entries, while they are swapped
        self.on_failure: list = []  # called with the exception when the run stops on one (not while built aside)
        self.path = resolved.parent / f".{resolved.name}.cvtool-new" if staged else self.target

    @property
    def staged(self) -> bool:
        """Still built aside (not yet published)."""
        return self.path != self.target

    def prepare(self) -> RunFolder:
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)  # left by a killed run
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            where = f"{self.path} beside {self.target} to build the new run in" if self.staged else str(self.path)
            raise UsageError(f"cannot create {where}: {exc.strerror or exc}") from None
        return self

    def publish(self) -> bool:
        """Replace the old run's entries in ``target`` by the new run's; False when there was nothing to do."""
        if not self.staged:
            return False
        staging, target, old = self.path, self.target, self._replaced
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir()
        target.mkdir(parents=True, exist_ok=True)
        for name in dict.fromkeys([*RUN_ENTRIES, *(p.name for p in staging.iterdir())]):
            if (target / name).exists() or (target / name).is_symlink():
                (target / name).rename(old / name)
        for entry in staging.iterdir():
            entry.rename(target / entry.name)
        staging.rmdir()
        shutil.rmtree(old, ignore_errors=True)
        self.path = target
        return True

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.staged:
            shutil.rmtree(self.path, ignore_errors=True)
        elif exc_type is not None:
            for hook in self.on_failure:
                with contextlib.suppress(Exception):  # the error being raised is what the user must see
                    hook(exc)


def finished_run(run: RunFolder, epochs_done: int, quiet: bool) -> TrainResult:
    """``--resume`` of a run that already ran its epochs: nothing to do, so a retried job succeeds.

    Returns the run's recorded result; a run with no ``cvtool.json`` (killed at its very end) is a usage error.
    """
    from cvtool.bundle import read_meta

    hint = "pass a larger --epochs to continue"
    if not (run.target / META_FILE).exists():
        raise UsageError(f"{run.target} already ran {epochs_done} epochs; {hint}")
    info(f"{run.target} already ran {epochs_done} epochs: nothing to do ({hint})", quiet)
    return TrainResult(run.target, read_meta(run.target).get("metrics", {}), [])


def prepare_run_dir(out: str | Path, overwrite: bool) -> RunFolder:
    """The folder a new run goes to: ``out``, or beside it when it replaces the run there (``overwrite``)."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a folder for the run")
    holds_run = (run_dir / MODEL_FILE).exists() or (run_dir / META_FILE).exists() or read_resume_point(run_dir)
    if holds_run and not overwrite:
        raise UsageError(
            f"{run_dir} already holds a trained or interrupted run; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    return RunFolder(run_dir, staged=bool(holds_run)).prepare()


def open_run(
    out: str | Path,
    cfg: TrainConfig | None,
    *,
    cls: type,
    kind: str,
    overwrite: bool = False,
    resume: bool = False,
    check=None,
):
    """(RunFolder, cfg, resume state or None), the config checked by ``check`` (default :func:`validate`) first.

    Resuming takes the run's stored config; only ``cfg.epochs`` (when ``cfg``
    is given) replaces the stored number of epochs.
    """
    check = check or validate
    if not resume:
        cfg = cfg or cls()
        check(cfg)
        return prepare_run_dir(out, overwrite), cfg, None
    run_dir = Path(out)
    state = read_resume_point(run_dir)
    if state is None:
        raise UsageError(f"nothing to resume in {run_dir}: no {CHECKPOINT_DIR}/last.json (start it without --resume)")
    if state.get("kind") != kind:
        raise UsageError(f"{run_dir} is a {state.get('kind')} run; resume it with cvtool {state.get('kind')}")
    stored = cls.from_dict(state["config"])
    if cfg is not None:
        stored.epochs = cfg.epochs
    check(stored)
    return RunFolder(run_dir), stored, state


def check_image_size(arch: str, side: int) -> None:
    """Refuse a square side the network cannot take (keras.applications' own minimum), before any decoding."""
    from cvtool.backbones import BACKBONES, min_image_size

    smallest = min_image_size(arch)
    if side < smallest:
        network = f"{arch} needs" if arch in BACKBONES else "the network needs"
        raise UsageError(f"--image-size {side} is too small: {network} at least {smallest} pixels")


def validate(cfg: TrainConfig) -> None:
    if cfg.epochs < 0:
        raise UsageError("--epochs must not be negative")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not cfg.lr > 0:  # NaN too
        raise UsageError("--lr must be positive")
    if cfg.image_size is not None:
        check_image_size(cfg.arch, cfg.image_size)
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise UsageError("--label-smoothing must be in [0, 1)")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise UsageError("--dropout must be in [0, 1)")
    if cfg.width < 1 or cfg.depth < 1:
        raise UsageError("--width and --depth must be at least 1")
    for value, allowed, option in (
        (cfg.optimizer, OPTIMIZERS, "--optimizer"),
        (cfg.checkpoint, CHECKPOINT_POLICIES, "--checkpoint"),
        (cfg.monitor, MONITORS, "--monitor"),
        (cfg.class_weight, CLASS_WEIGHTS, "--class-weight"),
        (cfg.loop, LOOPS, "--loop"),
        (cfg.mixed_precision, ("auto", "on", "off"), "--mixed-precision"),
        (cfg.layout, LAYOUTS, "--layout"),
        (cfg.lr_schedule, LR_SCHEDULES, "--lr-schedule"),
    ):
        if value not in allowed:
            raise UsageError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.patience < 0:
        raise UsageError("--patience must not be negative")
    if not (math.isfinite(cfg.warmup) and cfg.warmup >= 0):
        raise UsageError(f"--warmup must be a number of epochs, 0 or more, got {cfg.warmup}")
    validate_augment(cfg.augment)


@dataclass
class TrainingData:
    """Decoded train/validation splits and what is derived from them."""

    splits: object
    train_set: object  # data.DecodedSet
    val_set: object
    image_size: tuple[int, int]
    failures: list[Failure]
    class_weights: np.ndarray | None

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    @property
    def has_val(self) -> bool:
        return len(self.val_set.labels) > 0


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (classes * count): each class contributes equally to the loss (scikit-learn's "balanced")."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def load_data(
    data: str | Path, cfg: TrainConfig, *, run_dir: Path, side: int, quiet: bool = False, exclude: Path | None = None
) -> TrainingData:
    """Find the splits, decode each once (the cache), write errors.csv, derive class weights.

    ``exclude``: a folder inside ``data`` that is never read as data (the run being written).
    A class none of whose training images can be read is dropped, with a warning.
    """
    from cvtool.data import bootstrap_sample, decode_set, discover, drop_classes_without_images

    data = fetch(data, "data")  # a URL: the labelled folder is copied once into the cache (read every epoch)
    splits = discover(data, cfg.val_split, cfg.seed, layout=cfg.layout, exclude=exclude)
    image_size = (side, side)
    info(
        f"{len(splits.train)} training files, {len(splits.validation)} validation, at {side}x{side}; "
        f"classes: {', '.join(splits.class_names)}",
        quiet,
    )
    train_set = decode_set(splits.train, image_size, "decoding train", quiet, cache_dir=run_dir)
    val_set = decode_set(splits.validation, image_size, "decoding validation", quiet, cache_dir=run_dir)
    failures = train_set.failures + val_set.failures
    write_csv(run_dir / ERRORS_FILE, ["path", "error"], ((path_cell(f.item.rel), f.reason) for f in failures))
    for f in failures:
        warn(f"skipped {path_cell(f.item.rel)}: {f.reason}")
    if len(train_set.labels) == 0:
        raise UnusableError(f"no readable training images in {data}")
    kept, dropped, (train_set, kept_val) = drop_classes_without_images(splits.class_names, train_set, val_set)
    for name in dropped:
        left_out = int(np.sum(val_set.labels == splits.class_names.index(name)))
        also = f" (its {left_out} validation images are left out too)" if left_out else ""
        warn(f"class {name} dropped: none of its training images could be read{also}")
    if len(kept) < 2:
        raise UnusableError(f"{data}: only class {kept[0]} has readable training images; at least two are needed")
    splits, val_set = dataclasses.replace(splits, class_names=kept), kept_val
    if cfg.bootstrap:
        train_set = bootstrap_sample(train_set, cfg.seed)
        unique = len(np.unique([item.rel for item in train_set.items]))
        info(f"bootstrap sample (seed {cfg.seed}): {unique} distinct training images of {len(train_set.labels)}", quiet)
    weights = None
    if cfg.class_weight == "balanced":
        weights = balanced_class_weights(train_set.labels, len(splits.class_names))
        info("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(splits.class_names, weights)), quiet)
    return TrainingData(splits, train_set, val_set, image_size, failures, weights)


class Trainer:
    """Runs epochs of a model on :class:`TrainingData` into a run directory, with every callback.

    The same callback objects serve every :meth:`fit` call (finetune's two
    phases) and both loops, so model.keras is the best epoch of the whole run,
    history.csv has one row per epoch and the resume point follows along.
    """

    def __init__(self, run: RunFolder, cfg: TrainConfig, data: TrainingData, *, kind: str, quiet: bool, strategy):
        self.run, self.cfg, self.data, self.kind, self.quiet = run, cfg, data, kind, quiet
        run_dir = run.path
        self.strategy = strategy
        monitor = cfg.monitor
        if monitor.startswith("val_") and not data.has_val:
            monitor = monitor[len("val_") :]
            warn(f"no validation images: monitoring {monitor} instead of {cfg.monitor}")
        self.monitor = monitor
        self.tracker = MonitorTracker(monitor, cfg.min_delta)
        self.saver = BestModelSaver(run_dir / MODEL_FILE, self.tracker)
        loss_key = "val_loss" if data.has_val else "loss"
        self.checkpointer = Checkpointer(run_dir / CHECKPOINT_DIR, cfg.checkpoint, self.saver, loss_key)
        self.stopper = EarlyStopper(cfg.patience, self.saver)
        self.history = HistoryWriter(run_dir)
        self.resume_point = ResumePoint(
            run_dir / CHECKPOINT_DIR,
            {"best": self.saver, "checkpoint": self.checkpointer, "early_stopping": self.stopper},
            {"kind": kind, "config": cfg.to_dict()},
        )
        self.logger = EpochLogger(self._total_epochs(), quiet)
        self.epoch = 0  # epochs completed
        self.phase: str | None = None
        self.base_lr = cfg.lr  # the learning rate given to compile(): the schedule's peak
        self.schedule_start = 0  # the epoch the current phase (and its lr schedule) started at
        self.board = None  # the current fit's TensorBoard writer
        self.report = None
        if getattr(cfg, "report", True):
            from cvtool.training_report import TrainingReport

            self.report = TrainingReport(self)
            self.report.start()
            run.on_failure.append(self.report.failed)  # a run that stops on an error says so on its page

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def publish(self) -> None:
        """Move a run built aside into place (see :class:`RunFolder`); the callbacks write there from now on."""
        aside = self.run.path
        if self.run.publish():
            for cb in (self.saver, self.checkpointer, self.history, self.resume_point, self.board):
                if cb is not None:
                    _relocate(cb, aside, self.run.path)

    def _total_epochs(self) -> int:
        return self.cfg.epochs

    def restore(self, state: dict) -> None:
        """Continue after ``state`` (a resume point): callbacks' state, history rows, epoch counter."""
        self.epoch = int(state["epoch"])
        self.phase = state.get("phase")
        self.base_lr = float(state.get("base_lr", self.cfg.lr))
        self.schedule_start = int(state.get("schedule_start", 0))
        for key, cb in self.resume_point.stateful.items():
            cb.restore(state["callbacks"].get(key, {}))
        self.history.restore({}, self.epoch)
        for path in (self.run_dir / CHECKPOINT_DIR).glob("epoch-*.keras"):
            if int(path.name.split("-")[1]) > self.epoch:  # written after the resume point: a lost future
                path.unlink(missing_ok=True)

    def load_resume_model(self, state: dict):
        """The model of the resume point, compiled, with its optimizer state."""
        from cvtool.bundle import load_keras_model

        with self.strategy.scope():
            return load_keras_model(self.run_dir / CHECKPOINT_DIR / state["model"], compile=True)

    def compile(self, model, lr: float, optimizer=None) -> None:
        """Compile with the run's optimizer (a new one at ``lr``, or ``optimizer``), loss and accuracy."""
        self.base_lr = self.resume_point.info["base_lr"] = lr
        with self.strategy.scope():
            model.compile(
                optimizer=optimizer or make_optimizer(self.cfg.optimizer, lr),
                loss=make_loss(self.cfg.label_smoothing),
                metrics=["accuracy"],
            )

    def datasets(self, augment: bool = True, data: TrainingData | None = None):
        """(train, calibration) tf.data pipelines; validation reads the decoded images (:class:`ValidationScores`)."""
        from cvtool.data import training_dataset

        cfg, data = self.cfg, data or self.data
        batch = cfg.batch_size * self.strategy.num_replicas_in_sync
        augmenter = build_augmenter(cfg.augment, data.image_size, cfg.seed) if augment else None
        mixer = build_mixer(cfg.augment, cfg.seed) if augment else None
        n = data.num_classes
        train_ds = training_dataset(data.train_set, batch, True, cfg.seed, augmenter, n, data.class_weights, mixer)
        calibration = training_dataset(data.train_set, batch, True, cfg.seed + 1, None, n)
        return train_ds, calibration

    def fit(
        self,
        model,
        until: int,
        phase: str | None = None,
        augment: bool = True,
        *,
        data: TrainingData | None = None,
        saved=None,
    ) -> None:
        """Train ``model`` (compiled) from the current epoch up to epoch ``until`` (1-based, inclusive).

        ``data`` replaces the run's data for this call and ``saved`` is the model that
        model.keras, the checkpoints and the resume point hold: finetune's head trained on
        cached features (:mod:`cvtool.cached_features`) saves the full classifier it is part of.
        """
        if until <= self.epoch:
            return
        data = data or self.data
        train_ds, calibration = self.datasets(augment, data)
        steps = math.ceil(len(data.train_set.labels) / (self.cfg.batch_size * self.strategy.num_replicas_in_sync))
        if phase != self.phase:
            self.stopper.wait = 0
            self.phase = phase
            self.schedule_start = self.epoch
        self.resume_point.info["schedule_start"] = self.schedule_start
        if phase is not None:
            trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
            self.history.extra = {"phase": phase, "trainable_params": trainable}
            self.resume_point.info["phase"] = phase
        self.board = tensorboard(self.run_dir)
        # Order matters: recalibrate BN, then validate that model, then everything that reads val_* or saves it.
        schedule = LearningRateSchedule(
            self.base_lr,
            self.cfg.lr_schedule,
            start=self.schedule_start,
            end=until,
            steps=steps,
            warmup=self.cfg.warmup,
        )
        callbacks = [
            schedule,
            RecalibrateBatchNorm(calibration),
            ValidationScores(data.val_set.images, data.val_set.labels, self.cfg.batch_size),
            self.history,
            self.saver,
            self.checkpointer,
            self.stopper,
            self.board,
            self.logger,
            self.resume_point,
            PublishRun(self),  # after every file of the first epoch is saved
            ReportWriter(self),  # last: the page shows this epoch's history, in the published folder
        ]
        pinned = (self.saver, self.checkpointer, self.resume_point) if saved is not None else ()
        with acting_on(saved, pinned):
            self._run_loop(model, train_ds, until, callbacks, steps)
        self.epoch = self.stopper.last_epoch

    def _run_loop(self, model, train_ds, until: int, callbacks: list, steps: int) -> None:
        if self.cfg.loop == "custom":
            from cvtool.loop import custom_fit

            custom_fit(
                model,
                train_ds,
                until,
                self.epoch,
                callbacks,
                steps,
                label_smoothing=self.cfg.label_smoothing,
                strategy=self.strategy,
            )
        else:
            model.fit(
                train_ds,
                epochs=until,
                initial_epoch=self.epoch,
                callbacks=callbacks,
                verbose=0,
                shuffle=False,
            )

    def metrics(self) -> dict:
        return {"monitor": self.monitor, "best_epoch": self.saver.best_epoch, **self.saver.best_logs}

    def result(self, model) -> TrainResult:
        """The finished run's :class:`TrainResult`, after a line naming its best epoch."""
        metrics = self.metrics()
        info(f"best epoch {metrics['best_epoch']}: " + format_logs(self.saver.best_logs), self.quiet)
        return TrainResult(self.run.target, metrics, self.data.failures, model)


class PublishRun(keras.callbacks.Callback):
    """Publishes a run built aside (``--overwrite``) once its first epoch is saved: :meth:`Trainer.publish`."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        self.trainer.publish()


class ReportWriter(keras.callbacks.Callback):
    """Rewrites RUN/report.html at the end of every epoch (:class:`cvtool.training_report.TrainingReport`)."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        if self.trainer.report is not None:
            self.trainer.report.write()


def _relocate(callback, old: Path, new: Path) -> None:
    """Point the callback's paths inside ``old`` (model file, checkpoints, history, logs) at ``new``.

    TensorBoard's open event files moved with their folder and are written on as they are.
    """
    for name, value in list(vars(callback).items()):
        if isinstance(value, Path) and value.is_relative_to(old):
            setattr(callback, name, new / value.relative_to(old))


def write_run_meta(
    trainer: Trainer, data_root: str | Path, extra: dict, mixed: bool, preprocessing="built into the model"
) -> dict:
    """cvtool.json for a finished (or resumed and finished) run; history.png beside it."""
    data = trainer.data
    meta = {
        "task": "classification",
        "model_file": MODEL_FILE,
        "class_names": data.splits.class_names,
        "image_size": list(data.image_size),
        "input": {"color": "RGB", "range": [0, 255], "resize": "bilinear", "exif_orientation": "applied"},
        "preprocessing": preprocessing,
        **extra,
        "config": trainer.cfg.to_dict(),
        "training": {
            "kind": trainer.kind,
            "epochs_run": trainer.epoch,
            "stopped_early_at": trainer.stopper.stopped_epoch or None,
            "loop": trainer.cfg.loop,
            "strategy": type(trainer.strategy).__name__,
            "replicas": trainer.strategy.num_replicas_in_sync,
            "mixed_precision": mixed,
            "class_weights": None if data.class_weights is None else [float(w) for w in data.class_weights],
        },
        "data": {
            "root": redact(data_root) if is_url(data_root) else str(Path(data_root).resolve()),
            "layout": data.splits.layout,
            "train": int(len(data.train_set.labels)),
            "validation": int(len(data.val_set.labels)),
            "skipped": len(data.failures),
            # --bootstrap: how many different training images the sample holds
            "distinct_train": len({item.rel for item in data.train_set.items}),
        },
        "metrics": trainer.metrics(),
    }
    write_meta(trainer.run_dir, meta)
    plot_history(trainer.run_dir, best_epoch=trainer.saver.best_epoch)
    if trainer.report is not None:
        trainer.report.write(final=True)
    return meta


class precision_scope:
    """Sets the mixed-precision policy for a run and puts the previous one back afterwards."""

    def __init__(self, mode: str):
        from cvtool.devices import use_mixed_precision

        self.mixed = use_mixed_precision(mode)

    def __enter__(self) -> bool:
        from cvtool.devices import set_precision

        self.previous = set_precision(self.mixed)
        return self.mixed

    def __exit__(self, *exc) -> None:
        from cvtool.runtime import keras

        keras.mixed_precision.set_global_policy(self.previous)


def plot_history(run_dir: Path, best_epoch: int = 0) -> Path | None:
    """history.png: loss and accuracy curves, train and validation (fine-tuning phases and ``best_epoch`` marked)."""
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
    from matplotlib.ticker import MaxNLocator

    from cvtool.outputs import save_figure

    epochs = [int(r["epoch"]) for r in rows]
    phase_starts = [int(r["epoch"]) for i, r in enumerate(rows) if i > 0 and r.get("phase") != rows[i - 1].get("phase")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]
            if not all(np.isnan(values)):
                ax.plot(epochs, values, style, label=key)
        for start in phase_starts:
            ax.axvline(start - 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        if best_epoch:
            ax.axvline(
                best_epoch, color="#2e7d32", linestyle="-", alpha=0.4, linewidth=3, label=f"best epoch ({best_epoch})"
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    out = save_figure(fig, Path(run_dir) / "history.png")
    plt.close(fig)
    return out
