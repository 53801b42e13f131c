"""How the members of `train --members K` differ: one registered rule per ``--diversity`` mode.

Averaging models helps only where they make different mistakes; members that differ by
their seed alone make mostly the same ones. Each mode turns the ensemble's config into
member ``i``'s (0-based); every member's own config (seed, ``bootstrap``, augmentation)
is stored in its cvtool.json. No TensorFlow here: ``--help`` reads :data:`DIVERSITY`.

Example: ``member_config(TrainConfig(), 2, "all")`` is seed 44, a bootstrap sample, RandAugment 0.3;
``member_config(TrainConfig(), 2, "scale")`` is seed 44 at 80 px (small-cnn's 64 x 1.25).
"""

from __future__ import annotations

import dataclasses

from cvtool.backbones import default_image_size, min_image_size
from cvtool.config import AugmentConfig, TrainConfig
from cvtool.registry import Registry

DIVERSITY = Registry("--diversity")
DEFAULT_DIVERSITY = "seed"  # the diverse modes did not beat it where measured (bench/README.md)

# Member i's extra augmentation in the augment modes (cycled): each adds one kind of transform to the
# run's own switches; member 1 keeps them as they are.
AUGMENT_VARIANTS: tuple[dict, ...] = (
    {},
    {"zoom": 0.1, "shift": 0.1},
    {"randaugment": 0.3},
    {"mixup": 0.2},
    {"crop": 0.1, "brightness": 0.1},
)

# Member i's input side in the scale mode, as a factor of the run's own (cycled): 64 px gives 64, 48, 80, 56, 72.
SCALE_FACTORS: tuple[float, ...] = (1.0, 0.75, 1.25, 0.875, 1.125)


def member_config(cfg: TrainConfig, i: int, mode: str) -> TrainConfig:
    """Member ``i``'s (0-based) config under ``mode``: always seed ``cfg.seed + i``, then the mode's changes."""
    return DIVERSITY.get(mode)(dataclasses.replace(cfg, seed=cfg.seed + i), i)


def _varied_augment(augment: AugmentConfig, i: int) -> AugmentConfig:
    changes = AUGMENT_VARIANTS[i % len(AUGMENT_VARIANTS)]
    # a switch the run already sets higher is kept: the variant adds, never weakens
    return dataclasses.replace(augment, **{k: max(v, getattr(augment, k)) for k, v in changes.items()})


@DIVERSITY.register("seed", help="only the seed differs (weights, shuffling, augmentation draws)")
def _seed(cfg: TrainConfig, i: int) -> TrainConfig:
    return cfg


@DIVERSITY.register("bootstrap", help="each member trains on its own bootstrap sample of the training split")
def _bootstrap(cfg: TrainConfig, i: int) -> TrainConfig:
    return dataclasses.replace(cfg, bootstrap=True)


@DIVERSITY.register("augment", help="each member adds a different augmentation (zoom+shift, RandAugment, MixUp...)")
def _augment(cfg: TrainConfig, i: int) -> TrainConfig:
    return dataclasses.replace(cfg, augment=_varied_augment(cfg.augment, i))


@DIVERSITY.register("scale", help="each member sees the photos at its own input size (64 px: 64, 48, 80, 56, 72)")
def _scale(cfg: TrainConfig, i: int) -> TrainConfig:
    side = cfg.image_size or default_image_size(cfg.arch)
    scaled = round(side * SCALE_FACTORS[i % len(SCALE_FACTORS)] / 4) * 4  # a multiple of 4
    return dataclasses.replace(cfg, image_size=max(min_image_size(cfg.arch), scaled))  # never below what it takes


@DIVERSITY.register("all", help="bootstrap samples and varied augmentation")
def _all(cfg: TrainConfig, i: int) -> TrainConfig:
    return _augment(_bootstrap(cfg, i), i)
