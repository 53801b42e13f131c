"""Training-time augmentation as Keras preprocessing layers, run inside tf.data.

Augmentation runs in the input pipeline (in parallel with the training step)
and is not part of the saved model, so predict never pays for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class AugmentConfig:
    """Switches for random training-time transforms (0 turns one off)."""

    hflip: bool = True
    vflip: bool = False
    rotation: float = 0.0  # fraction of a full turn, as keras.layers.RandomRotation
    zoom: float = 0.0  # fraction, in and out
    shift: float = 0.0  # fraction of height/width
    shear: float = 0.0  # shear intensity, as keras.layers.RandomShear
    crop: float = 0.0  # crop away up to this fraction of each side, resize back
    contrast: float = 0.0  # factor, as keras.layers.RandomContrast
    brightness: float = 0.0  # fraction of the 0-255 range

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return any(v for v in asdict(self).values())


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
    return keras.Sequential(steps, name="augment")
