"""Training-time augmentation as Keras preprocessing layers, run inside tf.data.

Augmentation runs in the input pipeline (in parallel with the training step)
and is not part of the saved model, so predict never pays for it.
"""

from __future__ import annotations

import math

from cvtool.config import AugmentConfig
from cvtool.errors import UsageError

# (lowest, highest, highest allowed): what the Keras layers accept for one value v used as [-v, v]
# (RandomZoom needs v < 1: a zoom factor of 1 - v must stay positive), and for crop a window
# of at least half of each side, so small inputs never shrink to a few pixels.
AUGMENT_RANGES: dict[str, tuple[float, float, bool]] = {
    "rotation": (0.0, 0.5, True),  # half a turn each way covers every angle
    "zoom": (0.0, 1.0, False),
    "shift": (0.0, 1.0, True),
    "shear": (0.0, 1.0, True),
    "crop": (0.0, 0.5, True),
    "contrast": (0.0, 1.0, True),
    "brightness": (0.0, 1.0, True),
    "randaugment": (0.0, 1.0, True),
    "mixup": (0.0, 1.0, True),
    "cutmix": (0.0, 1.0, True),
}


def validate_augment(cfg: AugmentConfig) -> None:
    """Refuse values the transforms cannot use, naming the option and its range (before any decoding).

    Example: ``validate_augment(AugmentConfig(zoom=5))`` raises ``UsageError("--zoom must be in [0, 1), got 5.0")``.
    """
    for name, (low, high, closed) in AUGMENT_RANGES.items():
        value = float(getattr(cfg, name))
        inside = math.isfinite(value) and low <= value and (value <= high if closed else value < high)
        if not inside:
            bracket = "]" if closed else ")"
            raise UsageError(f"--{name} must be in [{low:g}, {high:g}{bracket}, got {value:g}")


def build_augmenter(cfg: AugmentConfig, image_size: tuple[int, int], seed: int | None = None):
    """A keras.Sequential applying the enabled transforms to float batches in [0, 255], or None."""
    if not cfg.enabled:
        return None
    from cvtool.runtime import keras

    layers = keras.layers

    h, w = image_size
    steps = []
    mode = "horizontal_and_vertical" if cfg.hflip and cfg.vflip else "horizontal" if cfg.hflip else "vertical"
    if cfg.hflip or cfg.vflip:
        steps.append(layers.RandomFlip(mode, seed=seed))
    if cfg.rotation:
        steps.append(layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed))
    if cfg.zoom:
        steps.append(layers.RandomZoom(cfg.zoom, cfg.zoom, fill_mode="reflect", seed=seed))
    if cfg.shift:
        steps.append(layers.RandomTranslation(cfg.shift, cfg.shift, fill_mode="reflect", seed=seed))
    if cfg.shear:
        steps.append(layers.RandomShear(x_factor=cfg.shear, y_factor=cfg.shear, fill_mode="reflect", seed=seed))
    if cfg.crop:
        ch, cw = max(1, round(h * (1 - cfg.crop))), max(1, round(w * (1 - cfg.crop)))
        steps += [layers.RandomCrop(ch, cw, seed=seed), layers.Resizing(h, w)]
    if cfg.contrast:
        steps.append(layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed))
    if cfg.brightness:
        steps.append(layers.RandomBrightness(cfg.brightness, value_range=(0, 255), seed=seed))
    if cfg.randaugment:
        steps.append(layers.RandAugment(value_range=(0, 255), factor=cfg.randaugment, seed=seed))
    return keras.Sequential(steps, name="augment")


def build_mixer(cfg: AugmentConfig, seed: int | None = None):
    """A function (images, one-hot labels) -> (mixed images, soft labels) for MixUp and/or CutMix, or None.

    Runs on whole batches in tf.data after the per-image transforms; with both on, each
    batch gets one of the two (a fair coin), as timm does. The loss takes the soft labels
    as they are (categorical cross-entropy); validation keeps hard labels.

    Example: ``mix = build_mixer(AugmentConfig(mixup=0.2)); x, y = mix(x, tf.one_hot(labels, 10))``.
    """
    if not cfg.mixes:
        return None
    from cvtool.runtime import keras, tf

    layers = []
    if cfg.mixup:
        layers.append(keras.layers.MixUp(alpha=cfg.mixup, seed=seed))
    if cfg.cutmix:
        layers.append(keras.layers.CutMix(factor=cfg.cutmix, seed=seed))

    def apply(layer, x, y):
        out = layer({"images": x, "labels": y}, training=True)
        return out["images"], tf.cast(out["labels"], y.dtype)

    if len(layers) == 1:
        return lambda x, y: apply(layers[0], x, y)

    def either(x, y):
        pick = tf.random.uniform([], seed=seed) < 0.5
        return tf.cond(pick, lambda: apply(layers[0], x, y), lambda: apply(layers[1], x, y))

    return either
