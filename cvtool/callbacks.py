"""Keras callbacks shared by `train` and `finetune`, in both training loops.

``model.fit`` drives them, and so does the custom ``tf.GradientTape`` loop
(:mod:`cvtool.loop`), so checkpoints, early stopping, history and precise BN
have one implementation each. Callbacks that hold state across epochs
(``state()``/``restore()``) are saved in the resume point, so ``--resume``
continues exactly where a killed run stopped.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cvtool.bundle import CHECKPOINT_DIR, link_model, save_model
from cvtool.outputs import write_csv, write_json
from cvtool.progress import Progress
from cvtool.runtime import keras, tf

HISTORY_FILE = "history.csv"
LOG_DIR = "logs"
RESUME_FILE = "last.json"
CHECKPOINT_POLICIES = ("best", "every-epoch", "none")
MONITORS = ("val_loss", "val_accuracy", "loss", "accuracy")


def format_logs(logs: dict) -> str:
    return " ".join(f"{k} {float(v):.3g}" if k == "lr" else f"{k} {float(v):.4f}" for k, v in logs.items())


def _scalars(logs: dict | None) -> dict:
    return {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}


@contextmanager
def acting_on(model, callbacks: Sequence):
    """While training another model, ``callbacks`` act on ``model`` (Keras would hand them the trained one).

    Finetune's head on cached features trains a small model that shares its weights
    with the classifier; the callbacks that save (model.keras, checkpoints, resume
    point) must save the classifier. Usage: ``with acting_on(full, [saver]): head.fit(...)``.
    """
    for cb in callbacks:
        cb.set_model(model)
        cb.set_model = lambda _model: None  # Keras' fit and CallbackList call it with the trained model
    try:
        yield
    finally:
        for cb in callbacks:
            del cb.set_model


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Precise BatchNorm: re-estimate BN moving statistics at the end of every epoch.

    Moving averages lag behind fast-changing weights, and on small data sets
    (a few steps per epoch) they make validation accuracy sit at chance while
    training accuracy climbs. This averages the batch statistics of up to
    ``max_batches`` un-augmented training batches under the current weights.
    Frozen BN layers (trainable=False, e.g. a fine-tuned backbone's) are left
    alone. It must come first among the callbacks: :class:`ValidationScores`,
    the checkpoints and the history all measure or save the recalibrated model.
    """

    def __init__(self, dataset, max_batches: int = 16):
        super().__init__()
        self.dataset, self.max_batches = dataset, max_batches
        self._forward = None  # a compiled training-mode forward pass (eager calls cost several times more)

    def on_epoch_end(self, epoch, logs=None):
        self.recalibrate()

    def recalibrate(self) -> None:
        from keras import layers

        from cvtool.architectures import all_layers

        bns = [
            layer
            for layer in all_layers(self.model)
            if isinstance(layer, layers.BatchNormalization) and layer.trainable
        ]
        if not bns:
            return
        saved = [layer.momentum for layer in bns]
        sums, n = None, 0
        try:
            # With momentum 0 a training-mode call leaves exactly that batch's statistics in the moving
            # averages; the compiled function is traced (and retraced) only while momentum is 0.
            for layer in bns:
                layer.momentum = 0.0
            if self._forward is None:
                self._forward = tf.function(lambda x: self.model(x, training=True), reduce_retracing=True)
            for batch in self.dataset.take(self.max_batches):
                self._forward(batch[0])
                stats = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in bns]
                sums = stats if sums is None else [(a + m, b + v) for (a, b), (m, v) in zip(sums, stats)]
                n += 1
            for layer, (mean_sum, var_sum) in zip(bns, sums or []):
                layer.moving_mean.assign(mean_sum / n)
                layer.moving_variance.assign(var_sum / n)
        finally:
            for layer, momentum in zip(bns, saved):
                layer.momentum = momentum


class ValidationScores(keras.callbacks.Callback):
    """Adds ``val_loss`` and ``val_accuracy`` of the model as it ends the epoch to the epoch's logs.

    Computed the way ``cvtool evaluate`` computes ``loss`` and ``accuracy`` (from the
    probabilities, :func:`cvtool.metrics.mean_cross_entropy`), so checkpoint choice, early
    stopping, ``history.csv`` and ``cvtool.json`` report what ``evaluate`` finds for the
    saved model. (Keras' own validation takes the loss from the softmax's logits, with no
    floor, and with the training's label smoothing: a different figure.) Comes after
    :class:`RecalibrateBatchNorm` and before every callback that reads ``val_*``; both loops
    use it. Usage: ``ValidationScores(val_set.images, val_set.labels, batch_size=32)``.
    """

    def __init__(self, images, labels, batch_size: int):
        super().__init__()
        self.images, self.labels, self.batch_size = images, np.asarray(labels), batch_size
        self._forward = None  # a compiled inference-mode forward pass

    def probabilities(self) -> np.ndarray:
        if self._forward is None:
            self._forward = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        out = []
        for start in range(0, len(self.labels), self.batch_size):
            x = np.asarray(self.images[start : start + self.batch_size], dtype=np.float32)
            out.append(np.asarray(self._forward(x), dtype=np.float32))
        return np.concatenate(out)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or len(self.labels) == 0:
            return
        from cvtool.metrics import mean_cross_entropy

        probs = self.probabilities()
        truth = self.labels
        logs["val_loss"] = mean_cross_entropy(probs[np.arange(len(truth)), truth])
        logs["val_accuracy"] = float(np.mean(np.argmax(probs, axis=1) == truth))


class MonitorTracker:
    """The one rule for "better": beats the best so far by more than ``min_delta`` (lower for losses)."""

    def __init__(self, monitor: str, min_delta: float = 0.0):
        self.monitor, self.min_delta = monitor, abs(min_delta)
        self.higher_is_better = "acc" in monitor
        self.best = -math.inf if self.higher_is_better else math.inf
        self.best_epoch = 0  # 1-based; 0: none yet
        self.best_logs: dict = {}

    def improved(self, value) -> bool:
        if value is None or not np.isfinite(value):
            return False
        if self.best_epoch == 0:
            return True
        if self.higher_is_better:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, epoch: int, logs: dict) -> bool:
        """Record epoch (0-based) if it improved; True when it did."""
        if not self.improved(logs.get(self.monitor)):
            return False
        self.best, self.best_epoch, self.best_logs = float(logs[self.monitor]), epoch + 1, _scalars(logs)
        return True

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_logs": self.best_logs}

    def restore(self, state: dict) -> None:
        self.best, self.best_epoch, self.best_logs = state["best"], state["best_epoch"], state["best_logs"]


class BestModelSaver(keras.callbacks.Callback):
    """Saves the model atomically to ``path`` (model.keras) whenever the monitor improves.

    The file is the deployable model, without the optimizer's state (resume
    points keep that). Keeps the best weights in memory too, so early stopping
    can restore them without reading the file back.
    """

    def __init__(self, path: Path, tracker: MonitorTracker):
        super().__init__()
        self.path, self.tracker = Path(path), tracker
        self.best_weights = None
        self.saved_epoch = 0  # 1-based epoch that ``path`` was last written for in this process; 0: none

    @property
    def best_epoch(self) -> int:
        return self.tracker.best_epoch

    @property
    def best_logs(self) -> dict:
        return self.tracker.best_logs

    def on_epoch_end(self, epoch, logs=None):
        if self.tracker.update(epoch, logs or {}):
            self.best_weights = self.model.get_weights()
            save_model(self.model, self.path)
            self.saved_epoch = epoch + 1

    def restore_best(self) -> bool:
        """Put the best weights back into the model; False when there are none."""
        weights = self.best_weights
        if weights is None and self.path.exists():
            from cvtool.bundle import load_keras_model

            weights = load_keras_model(self.path).get_weights()
        if weights is None:
            return False
        self.model.set_weights(weights)
        return True

    def state(self) -> dict:
        return self.tracker.state()

    def restore(self, state: dict) -> None:
        self.tracker.restore(state)


class Checkpointer(keras.callbacks.Callback):
    """``RUN/checkpoints/epoch-003-val_loss-0.4123.keras`` per ``policy``: deployable models, like model.keras.

    ``best`` keeps one file, the best epoch so far (same rule as model.keras);
    ``every-epoch`` keeps one file per epoch; ``none`` writes none. The file of
    the epoch that ``saver`` has just written to model.keras is a hard link to
    it, not a second copy. Runs after ``saver`` in the callback list.
    """

    def __init__(self, folder: Path, policy: str, saver: BestModelSaver, loss_key: str):
        super().__init__()
        self.folder, self.policy, self.saver, self.loss_key = Path(folder), policy, saver, loss_key
        self.tracker = saver.tracker
        self.current_best: str | None = None

    def file_name(self, epoch: int, logs: dict) -> str:
        value = logs.get(self.loss_key, float("nan"))
        return f"epoch-{epoch + 1:03d}-{self.loss_key}-{float(value):.4f}.keras"

    def save(self, epoch: int, path: Path) -> None:
        if self.saver.saved_epoch == epoch + 1:
            link_model(self.saver.path, path)
        else:
            save_model(self.model, path)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.policy == "every-epoch":
            self.save(epoch, self.folder / self.file_name(epoch, logs))
        elif self.policy == "best" and self.tracker.best_epoch == epoch + 1:
            name = self.file_name(epoch, logs)
            self.save(epoch, self.folder / name)
            if self.current_best and self.current_best != name:
                (self.folder / self.current_best).unlink(missing_ok=True)
            self.current_best = name

    def state(self) -> dict:
        return {"current_best": self.current_best}

    def restore(self, state: dict) -> None:
        self.current_best = state.get("current_best")


class EarlyStopper(keras.callbacks.Callback):
    """Stops after ``patience`` epochs without improvement (0 = off); restores the best weights.

    "Improvement" is the tracker's rule, the same one that picks model.keras,
    so the restored weights are the saved model's. The trainer resets ``wait``
    when a new finetune phase starts (each phase gets its own patience).
    """

    def __init__(self, patience: int, saver: BestModelSaver):
        super().__init__()
        self.patience, self.saver = patience, saver
        self.wait = 0
        self.stopped_epoch = 0  # 1-based; 0: ran to the end
        self.last_epoch = 0

    def on_train_begin(self, logs=None):
        self.stopped_epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = epoch + 1
        if self.patience <= 0:
            return
        if self.saver.tracker.best_epoch == epoch + 1:
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.patience > 0 and self.saver.best_epoch not in (0, self.last_epoch):
            self.saver.restore_best()

    def state(self) -> dict:
        return {"wait": self.wait}

    def restore(self, state: dict) -> None:
        self.wait = state.get("wait", 0)


class HistoryWriter(keras.callbacks.Callback):
    """Rewrites ``history.csv`` (one row per epoch) after every epoch; ``extra`` adds columns (the phase)."""

    def __init__(self, run_dir: Path, extra: dict | None = None):
        super().__init__()
        self.run_dir, self.rows, self.extra = Path(run_dir), [], dict(extra or {})
        self._start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **self.extra, **_scalars(logs)}
        row["seconds"] = round(time.monotonic() - self._start, 3)
        self.rows.append(row)
        header = list(dict.fromkeys(k for r in self.rows for k in r))
        write_csv(self.run_dir / HISTORY_FILE, header, ([r.get(k, "") for k in header] for r in self.rows))

    def state(self) -> dict:
        return {}

    def restore(self, state: dict, epochs_done: int) -> None:
        """Reload rows written before the interruption (up to the resume point)."""
        path = self.run_dir / HISTORY_FILE
        if not path.exists():
            return
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= epochs_done]
        self.rows = [{k: _number(v) for k, v in r.items()} for r in rows]


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


class EpochLogger(keras.callbacks.Callback):
    """One line per epoch on stderr, and the batches' progress within it (Keras' own bar is off: it floods cron logs).

    Within an epoch, as every command does (:class:`cvtool.progress.Progress`): a bar on a
    terminal, else a line every ~10 s (``epoch 3/10 batches: 12/40 (1.2/s)``), so a long
    epoch in cron still shows it is alive. Usage: ``EpochLogger(epochs=10, quiet=False)``.
    """

    def __init__(self, epochs: int, quiet: bool, prefix: str = ""):
        super().__init__()
        self.epochs, self.quiet, self.prefix = epochs, quiet, prefix
        self._start = time.monotonic()
        self._batches: Progress | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()
        steps = (self.params or {}).get("steps")
        self._batches = Progress(
            steps, f"{self.prefix}epoch {epoch + 1}/{self.epochs} batches", self.quiet, unit="batch", leave=False
        )

    def on_train_batch_end(self, batch, logs=None):
        if self._batches is not None:
            self._batches.update()

    def on_train_end(self, logs=None):
        self._close()

    def _close(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def on_epoch_end(self, epoch, logs=None):
        self._close()
        if not self.quiet:
            took = time.monotonic() - self._start
            print(
                f"{self.prefix}epoch {epoch + 1}/{self.epochs}: {format_logs(_scalars(logs))} ({took:.1f}s)",
                file=sys.stderr,
                flush=True,
            )


class ResumePoint(keras.callbacks.Callback):
    """After every epoch, the resume point: ``checkpoints/last-epoch-NNN.keras`` + ``checkpoints/last.json``.

    The model is saved with its optimizer state (model.keras and the checkpoints
    leave it out); ``last.json`` (epoch reached,
    the run's config and the other callbacks' state) is written after it and
    names it, both atomically, so a run killed at any moment (kill -9 included)
    leaves a consistent pair that ``--resume`` continues from.
    """

    def __init__(self, folder: Path, stateful: dict, info: dict):
        super().__init__()
        self.folder, self.stateful, self.info = Path(folder), stateful, info

    def on_epoch_end(self, epoch, logs=None):
        name = f"last-epoch-{epoch + 1:03d}.keras"
        save_model(self.model, self.folder / name, optimizer=True)
        state = {
            **self.info,
            "epoch": epoch + 1,
            "model": name,
            "callbacks": {key: cb.state() for key, cb in self.stateful.items()},
        }
        write_json(self.folder / RESUME_FILE, state)
        # Every older resume point goes, including one orphaned by a kill between the two writes above
        # and the clean-up of an earlier epoch.
        for stale in self.folder.glob("last-epoch-*.keras"):
            if stale.name != name:
                stale.unlink(missing_ok=True)


def read_resume_point(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CHECKPOINT_DIR / RESUME_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class TensorBoardScalars(keras.callbacks.Callback):
    """TensorBoard event files: ``RUN/logs/train`` and ``RUN/logs/validation``, one scalar per metric per epoch.

    Written with TensorFlow's own summary ops and the scalars plugin's
    metadata, so the ``tensorboard`` package (which Keras' TensorBoard
    callback needs) does not have to be installed to write them; the files
    read as usual in ``tensorboard --logdir RUN/logs``.
    """

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = Path(log_dir)
        self._writers: dict = {}

    def _writer(self, name: str):
        from cvtool.runtime import tf

        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(str(self.log_dir / name))
        return self._writers[name]

    def on_epoch_end(self, epoch, logs=None):
        from tensorflow.core.framework import summary_pb2

        from cvtool.runtime import tf

        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        metadata = summary_pb2.SummaryMetadata(plugin_data=plugin).SerializeToString()
        for key, value in _scalars(logs).items():
            split, name = ("validation", key[len("val_") :]) if key.startswith("val_") else ("train", key)
            with self._writer(split).as_default():
                tf.summary.write(f"epoch_{name}", tf.constant(value, tf.float32), step=epoch + 1, metadata=metadata)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def tensorboard(run_dir: Path) -> TensorBoardScalars:
    """TensorBoard event files under RUN/logs/."""
    return TensorBoardScalars(Path(run_dir) / LOG_DIR)


def scheduled_lr(base: float, schedule: str, progress: float, warmup: float = 0.0, elapsed: float = 0.0) -> float:
    """The learning rate at ``progress`` (0 to 1, through the phase) of ``schedule``.

    cosine: ``base * (1 + cos(pi * progress)) / 2``; step: ``base``, x0.1 from half-way, x0.01
    from three quarters; constant: ``base``. ``warmup`` (epochs) ramps it linearly from near 0
    over the first ``warmup`` epochs (``elapsed``: epochs done in the phase, fractional).
    Example: ``scheduled_lr(1e-3, "cosine", 0.5) == 5e-4``.
    """
    if schedule == "cosine":
        lr = base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    elif schedule == "step":
        lr = base * (0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0)
    else:
        lr = base
    if warmup > 0 and elapsed < warmup:
        lr *= (elapsed + 1e-3) / warmup
    return lr


class LearningRateSchedule(keras.callbacks.Callback):
    """Sets the optimizer's learning rate before every training step (:func:`scheduled_lr`), both loops.

    The schedule spans one phase, epochs ``start`` to ``end``; it is a function of the step
    alone, so a resumed run continues on the same curve. Adds ``lr`` (the rate of the epoch's
    first step) to the epoch's logs, hence to history.csv.
    Usage: ``LearningRateSchedule(1e-3, "cosine", start=0, end=10, steps=40)``.
    """

    def __init__(self, base: float, schedule: str, *, start: int, end: int, steps: int, warmup: float = 0.0):
        super().__init__()
        self.base, self.schedule, self.warmup = base, schedule, warmup
        self.start, self.end, self.steps = start, end, max(1, steps)
        self._epoch, self._first = start, base

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._first = None

    def on_train_batch_begin(self, batch, logs=None):
        elapsed = (self._epoch - self.start) + batch / self.steps
        span = max(1, self.end - self.start)
        lr = scheduled_lr(self.base, self.schedule, elapsed / span, self.warmup, elapsed)
        self.model.optimizer.learning_rate.assign(lr)
        if self._first is None:
            self._first = lr

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._first is not None:
            logs["lr"] = self._first
