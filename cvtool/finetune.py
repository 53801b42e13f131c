"""`cvtool finetune`: transfer learning from a pretrained backbone, in two phases.

Phase "head": the backbone is frozen and a new head (global average pooling,
dropout, dense softmax) is trained for ``head_epochs`` at ``lr``. Phase
"fine-tune": the top ``unfreeze`` layers of the backbone (or the top
``unfreeze_fraction`` of them) are unfrozen and everything trainable is
trained for ``epochs`` more at ``fine_tune_lr`` (default lr / 10).

With pretrained weights the backbone is called with ``training=False`` and
its BatchNormalization layers stay frozen in both phases: their ImageNet
statistics are kept, the known fine-tuning pitfall (batch statistics of a
small data set wrecking them) is avoided, and frozen layers stay
bit-identical to the loaded weights. With ``weights="none"`` there are no
statistics to keep: BatchNormalization trains in both phases (batch
statistics in training, moving averages re-estimated every epoch), since a
random backbone normalised by its initial statistics gives the same features
for every image.

``hub:HANDLE_OR_PATH`` backbones (TF-Hub image feature vectors) are loaded
with ``hub.load`` as frozen feature extractors: Keras 3 cannot train a
``hub.KerasLayer``, so features are computed once per image and the head is
trained on them (head phase only; no augmentation). The run directory keeps
a copy of the SavedModel so ``predict`` needs nothing else.

Everything else (data cache, callbacks, checkpoints, early stopping,
``--resume``, both loops, run directory) is the trainer's, :mod:`cvtool.trainer`.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

import cvtool.runtime  # noqa: F401 - quiet TensorFlow import
from cvtool.cached_features import use_cached_features
from cvtool.config import HUB_PREFIX, FinetuneConfig
from cvtool.errors import UnusableError, UsageError
from cvtool.locks import holds_output_lock
from cvtool.progress import info
from cvtool.trainer import (
    RunFolder,
    Trainer,
    TrainingData,
    TrainResult,
    finished_run,
    load_data,
    open_run,
    precision_scope,
    validate,
    write_run_meta,
)

HUB_IMAGE_SIZE = 224
HEAD_PHASE, FINE_TUNE_PHASE = "head", "fine-tune"


def validate_finetune(cfg: FinetuneConfig) -> None:
    validate(cfg)
    if cfg.head_epochs < 0:
        raise UsageError("--head-epochs must not be negative")
    if cfg.head_epochs + cfg.epochs < 1:
        raise UsageError("--head-epochs plus --epochs must be at least 1")
    if cfg.unfreeze is not None and cfg.unfreeze < 0:
        raise UsageError("--unfreeze must not be negative")
    if not 0.0 <= cfg.unfreeze_fraction <= 1.0:
        raise UsageError("--unfreeze-fraction must be in [0, 1]")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UsageError("--dropout must be in [0, 1)")
    if cfg.fine_tune_lr is not None and not cfg.fine_tune_lr > 0:  # NaN too
        raise UsageError("--fine-tune-lr must be positive")
    if cfg.is_hub and not cfg.arch[len(HUB_PREFIX) :]:
        raise UsageError("--backbone hub: needs a handle or a path, e.g. hub:/models/feature_vector")
    if not cfg.is_hub:
        from cvtool.backbones import get_backbone

        get_backbone(cfg.arch)
    use_cached_features(cfg)  # refuses --cache-features on where features change


def build_model(cfg: FinetuneConfig, num_classes: int, image_size: tuple[int, int]):
    """The classifier with the backbone's weights loaded per ``cfg.weights`` (imagenet, none or a file)."""
    from cvtool.architectures import backbone_classifier
    from cvtool.backbones import get_backbone

    backbone = get_backbone(cfg.arch)
    weights = cfg.weights
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise UnusableError(f"--weights {weights}: no such file (give imagenet, none or a weights file)")
    try:
        return backbone_classifier(
            backbone,
            num_classes,
            image_size,
            weights=None if weights == "none" else weights,
            dropout=cfg.dropout,
            backbone_training=False if cfg.pretrained else None,
        )
    except Exception as exc:  # noqa: BLE001 - download failures, wrong file: one line
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        if weights == "imagenet":
            raise UnusableError(
                f"cannot get imagenet weights for {backbone.name} ({reason}); on an offline machine pass "
                "--weights PATH (a weights file of the backbone without its top) or --weights none"
            ) from None
        raise UnusableError(
            f"cannot load --weights {weights} into {backbone.name} at {image_size[0]}x{image_size[1]} "
            f"without top ({reason})"
        ) from None


def backbone_layers(model) -> list:
    from cvtool.runtime import keras

    net = model.get_layer("backbone")
    return [layer for layer in net.layers if not isinstance(layer, keras.layers.InputLayer)]


def _is_batchnorm(layer) -> bool:
    from cvtool.runtime import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def freeze_backbone(model, cfg: FinetuneConfig) -> None:
    """Freeze the backbone; without pretrained weights its BatchNormalization layers still train."""
    model.get_layer("backbone").trainable = False
    if not cfg.pretrained:
        for layer in backbone_layers(model):
            layer.trainable = _is_batchnorm(layer)


def unfreeze_top(model, cfg: FinetuneConfig) -> int:
    """Unfreeze the top layers of the backbone (pretrained BatchNormalization stays frozen); returns how many."""
    layers = backbone_layers(model)
    n = cfg.unfreeze if cfg.unfreeze is not None else int(round(cfg.unfreeze_fraction * len(layers)))
    n = min(n, len(layers))
    net = model.get_layer("backbone")
    net.trainable = True
    for i, layer in enumerate(layers):
        top = i >= len(layers) - n
        layer.trainable = not cfg.pretrained if _is_batchnorm(layer) else top
    return n


@holds_output_lock("out", folder=True)
def finetune(
    data: str | Path,
    out: str | Path,
    *,
    cfg: FinetuneConfig | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune ``cfg.arch`` (a pretrained backbone) on the labelled folder ``data``; write the run ``out``.

    Args:
        data: DATA/<class>/ or DATA/train|validation|test/<class>/ (``cfg.layout``).
        out: the run directory, as :func:`cvtool.train.train` writes it.
        cfg: the options (default: ``FinetuneConfig()``); with ``resume``, only its ``epochs``
            (the fine-tune phase's) counts.
        overwrite: replace a run in ``out`` once the new one has saved its first epoch.
        quiet: no progress lines (warnings still print).
        resume: continue the run in ``out`` with its stored config.

    Returns:
        A :class:`cvtool.trainer.TrainResult`.

    Usage: ``finetune("photos/", "runs/ft", cfg=FinetuneConfig(arch="efficientnet_b0", epochs=10))``.
    """
    from cvtool.devices import seed_everything

    run, cfg, state = open_run(
        out, cfg, cls=FinetuneConfig, kind="finetune", overwrite=overwrite, resume=resume, check=validate_finetune
    )
    with run:
        total = cfg.head_epochs + (0 if cfg.is_hub else cfg.epochs)
        if state is not None and state["epoch"] >= total and state.get("phase") != HEAD_PHASE:
            return finished_run(run, state["epoch"], quiet)
        seed_everything(cfg.seed + (state["epoch"] if state else 0), cfg.deterministic)
        if cfg.is_hub:
            return _finetune_hub(data, run, cfg, state, quiet)
        return _finetune_backbone(data, run, cfg, state, quiet, total)


def _finetune_backbone(data, run: RunFolder, cfg: FinetuneConfig, state: dict | None, quiet: bool, total: int):
    """The two phases on a keras.applications backbone."""
    from cvtool.backbones import get_backbone
    from cvtool.devices import distribution_strategy, strategy_name

    backbone = get_backbone(cfg.arch)
    side = cfg.image_size or backbone.size
    cached = use_cached_features(cfg)
    with precision_scope(cfg.mixed_precision) as mixed:
        strategy = distribution_strategy()
        info(f"fine-tuning {cfg.arch} (weights {cfg.weights}, {strategy_name(strategy)})", quiet)
        tdata = load_data(data, cfg, run_dir=run.path, side=side, quiet=quiet, exclude=run.target)
        trainer = Trainer(run, cfg, tdata, kind="finetune", quiet=quiet, strategy=strategy)
        trainer.logger.epochs = total
        if state is not None:
            trainer.restore(state)
            model = trainer.load_resume_model(state)
            info(f"resuming {run.target} after epoch {trainer.epoch} ({trainer.phase} phase)", quiet)
        else:
            with strategy.scope():
                model = build_model(cfg, tdata.num_classes, tdata.image_size)
            freeze_backbone(model, cfg)
            trainer.compile(model, cfg.lr)
        phase_start = state.get("phase_start", 0) if state else 0
        if trainer.phase in (None, HEAD_PHASE) and trainer.epoch < cfg.head_epochs:
            trainer.resume_point.info["phase_start"] = phase_start
            if cached:
                fit_head_on_features(trainer, model, cfg, quiet)
            else:
                trainer.fit(model, cfg.head_epochs, phase=HEAD_PHASE)
        unfrozen = None
        if cfg.epochs > 0:
            if trainer.phase != FINE_TUNE_PHASE:
                phase_start = trainer.epoch
                unfrozen = unfreeze_top(model, cfg)
                trainer.compile(model, cfg.fine_tune_lr or cfg.lr / 10)
                bn = "stays frozen" if cfg.pretrained else "trains: no pretrained statistics"
                info(f"fine-tuning the top {unfrozen} backbone layers (BatchNormalization {bn})", quiet)
            trainer.resume_point.info["phase_start"] = phase_start
            trainer.logger.epochs = phase_start + cfg.epochs
            trainer.fit(model, phase_start + cfg.epochs, phase=FINE_TUNE_PHASE)
        trainer.publish()
        extra = {
            "arch": cfg.arch,
            "backbone": cfg.arch,
            "weights": cfg.weights,
            "phases": {
                "head_epochs": cfg.head_epochs,
                "fine_tune_epochs": cfg.epochs,
                "unfrozen_layers": unfrozen,
                "head_on_cached_features": cached,
            },
        }
        write_run_meta(trainer, data, extra, mixed)
    return trainer.result(model)


def fit_head_on_features(trainer: Trainer, model, cfg: FinetuneConfig, quiet: bool) -> None:
    """The head phase on cached features: the frozen backbone runs once per image, the head trains on its outputs.

    The head model shares its layers with ``model``, which is what model.keras, the
    checkpoints and the resume point save (see :mod:`cvtool.cached_features`).
    """
    from cvtool.cached_features import extract_features, head_model
    from cvtool.data import DecodedSet

    start = time.monotonic()
    data = trainer.data
    sets = [
        DecodedSet(extract_features(model, s.images, cfg.batch_size), s.labels, s.items, s.failures)
        for s in (data.train_set, data.val_set)
    ]
    n = len(sets[0].labels) + len(sets[1].labels)
    info(f"head phase on cached features: backbone run once over {n} images ({time.monotonic() - start:.1f}s)", quiet)
    head = head_model(model)
    trainer.compile(head, cfg.lr, optimizer=model.optimizer)  # the classifier's optimizer: resume points keep it
    features = dataclasses.replace(data, train_set=sets[0], val_set=sets[1])
    trainer.fit(head, cfg.head_epochs, phase=HEAD_PHASE, augment=False, data=features, saved=model)


def _finetune_hub(data, run: RunFolder, cfg: FinetuneConfig, state: dict | None, quiet: bool) -> TrainResult:
    """Head on frozen hub features; the SavedModel is copied into the run directory."""
    from cvtool.bundle import HUB_DIR, hub_features, load_hub_model
    from cvtool.data import DecodedSet
    from cvtool.devices import distribution_strategy
    from cvtool.runtime import keras

    handle = cfg.arch[len(HUB_PREFIX) :]
    extractor = load_hub_model(handle)
    side = cfg.image_size or HUB_IMAGE_SIZE
    with precision_scope("off") as mixed:
        strategy = distribution_strategy()
        info(f"hub feature extractor {handle} (frozen: only the head is trained, no augmentation)", quiet)
        tdata = load_data(data, cfg, run_dir=run.path, side=side, quiet=quiet, exclude=run.target)
        feats = [
            DecodedSet(hub_features(extractor, s.images, cfg.batch_size), s.labels, s.items, s.failures)
            for s in (tdata.train_set, tdata.val_set)
        ]
        dim = int(feats[0].images.shape[1])
        if not tdata.has_val:
            feats[1] = DecodedSet(np.zeros((0, dim), np.float32), feats[1].labels, [], [])
        fdata = TrainingData(tdata.splits, feats[0], feats[1], tdata.image_size, tdata.failures, tdata.class_weights)
        trainer = Trainer(run, cfg, fdata, kind="finetune", quiet=quiet, strategy=strategy)
        trainer.logger.epochs = cfg.head_epochs
        if state is not None:
            trainer.restore(state)
            model = trainer.load_resume_model(state)
        else:
            with strategy.scope():
                inputs = keras.Input(shape=(dim,), name="features")
                x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(inputs)
                outputs = keras.layers.Dense(fdata.num_classes, activation="softmax", name="predictions")(x)
                model = keras.Model(inputs, outputs, name="hub_head")
            trainer.compile(model, cfg.lr)
        trainer.fit(model, cfg.head_epochs, phase=HEAD_PHASE, augment=False)
        trainer.publish()
        _copy_hub_model(handle, trainer.run_dir / HUB_DIR)
        extra = {
            "arch": cfg.arch,
            "backbone": cfg.arch,
            "weights": "hub",
            "feature_extractor": {"type": "hub", "handle": handle, "path": HUB_DIR, "input_range": [0, 1], "dim": dim},
            "phases": {"head_epochs": cfg.head_epochs, "fine_tune_epochs": 0, "unfrozen_layers": 0},
        }
        write_run_meta(trainer, data, extra, mixed, preprocessing="pixels / 255, then the hub model")
    return trainer.result(model)


def _copy_hub_model(handle: str, dest: Path) -> None:
    """The SavedModel folder behind ``handle`` (a local path, or hub's download cache) into the run."""
    src = Path(handle)
    if not src.is_dir():
        from cvtool.runtime import tensorflow_hub

        hub = tensorflow_hub()

        src = Path(hub.resolve(handle))
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
