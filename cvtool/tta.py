"""`cvtool tta`: predictions averaged over augmented views of each image (test-time augmentation).

Each transform is a small function that turns a decoded image into one or
more views at the model's input size; :class:`TtaViews` strings the chosen
ones together. The views are built in the decode threads (each image is
opened once) and the views of a whole batch of images go through the model
in one call (:class:`cvtool.scoring.Scorer`), then are reduced per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from cvtool.bundle import Classifier
from cvtool.engines import EngineSettings
from cvtool.errors import UsageError
from cvtool.images import list_images, resize
from cvtool.inference import write_predictions
from cvtool.jobs import BatchJob, RunResult, Shard
from cvtool.locks import holds_output_lock
from cvtool.registry import Registry
from cvtool.rules import VIEW_REDUCERS, get_rule
from cvtool.scoring import Scorer, load_scorer
from cvtool.storage import stages_output

# Measured on clothing-small validation with default-recipe models (bench/tta_views.py, README): a flip helps,
# crops, scale crops, vflip and rot90 hurt there.
DEFAULT_TRANSFORMS = ("identity", "hflip")


@dataclass
class TtaOptions:
    """Which views to build and how to reduce them; stored as given on the command line."""

    transforms: tuple[str, ...] = DEFAULT_TRANSFORMS
    reduce: str = "mean"
    crop_scale: float = 0.875  # side of the five crops (and the smallest random scale crop), fraction of the image
    copies: int = 2  # random copies per jitter transform (scale, brightness)
    seed: int = 0
    brightness: float = 0.2  # brightness jitter: factor in [1 - b, 1 + b]

    def __post_init__(self) -> None:
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if not self.transforms or unknown:
            raise UsageError(
                f"unknown transform {', '.join(unknown) or '(none given)'}; choose from {', '.join(TRANSFORMS.names())}"
            )
        if len(set(self.transforms)) != len(self.transforms):
            raise UsageError("--transforms lists a transform twice")
        VIEW_REDUCERS.entry(self.reduce)  # an unknown name is refused with the choices
        if not 0.1 <= self.crop_scale <= 1.0:
            raise UsageError("--crop-scale must be between 0.1 and 1")
        if self.copies < 1:
            raise UsageError("--copies must be at least 1")


@dataclass
class ViewSource:
    """A decoded image, the input size to produce, and the image's own random generator."""

    img: Image.Image
    size: tuple[int, int]  # (height, width)
    rng: np.random.Generator
    options: TtaOptions = field(default_factory=TtaOptions)

    @cached_property
    def resized(self) -> np.ndarray:
        return resize(self.img, self.size)

    def crop(self, left: float, top: float, scale: float) -> np.ndarray:
        """The window of ``scale`` x the image's sides whose top-left is at fractions (left, top) of the slack."""
        w, h = self.img.size
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        x, y = round((w - cw) * left), round((h - ch) * top)
        return resize(self.img.crop((x, y, x + cw, y + ch)), self.size)


Transform = Callable[[ViewSource], list[np.ndarray]]

# Every TTA transform: its name on the command line, what it does, and how many views it makes
# (``views(options)``); ``--transforms``' help and choices, view_counts and the views themselves read it.
TRANSFORMS = Registry("transform")


def _one(options: TtaOptions) -> int:
    return 1


def _copies(options: TtaOptions) -> int:
    return options.copies


@TRANSFORMS.register("identity", help="the image as predict sees it", views=_one)
def identity(src: ViewSource) -> list[np.ndarray]:
    return [src.resized]


@TRANSFORMS.register("hflip", help="mirrored left-right", views=_one)
def hflip(src: ViewSource) -> list[np.ndarray]:
    return [src.resized[:, ::-1]]


@TRANSFORMS.register("vflip", help="upside down", views=_one)
def vflip(src: ViewSource) -> list[np.ndarray]:
    return [src.resized[::-1]]


@TRANSFORMS.register("rot90", help="a quarter turn", views=_one)
def rot90(src: ViewSource) -> list[np.ndarray]:
    """Rotated a quarter turn counter-clockwise (resized first to the transposed size, so nothing is cut)."""
    h, w = src.size
    return [np.rot90(resize(src.img, (w, h)))]


@TRANSFORMS.register("crop", help="5 crops: corners and centre", views=lambda options: 5)
def crop(src: ViewSource) -> list[np.ndarray]:
    """Five crops at ``crop_scale``: the four corners and the centre."""
    s = src.options.crop_scale
    return [src.crop(x, y, s) for x, y in ((0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5))]


@TRANSFORMS.register("scale", help="random scale crops", views=_copies)
def scale(src: ViewSource) -> list[np.ndarray]:
    """``copies`` random crops whose side is a random fraction in [crop_scale, 1], at a random position."""
    s = src.options.crop_scale
    return [src.crop(*src.rng.uniform(0, 1, 2), src.rng.uniform(s, 1.0)) for _ in range(src.options.copies)]


@TRANSFORMS.register("brightness", help="random brightness", views=_copies)
def brightness(src: ViewSource) -> list[np.ndarray]:
    """``copies`` copies with brightness multiplied by a random factor in [1 - b, 1 + b]."""
    b = src.options.brightness
    base = src.resized.astype(np.float32)
    factors = src.rng.uniform(1 - b, 1 + b, src.options.copies)
    return [np.clip(base * f + 0.5, 0, 255).astype(np.uint8) for f in factors]


class TtaViews:
    """The views function of a scorer: every chosen transform applied to one decoded image."""

    def __init__(self, options: TtaOptions):
        self.options = options

    def __call__(self, img: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
        src = ViewSource(img, size, rng, self.options)
        return [np.ascontiguousarray(v) for name in self.options.transforms for v in TRANSFORMS.get(name)(src)]


def view_counts(options: TtaOptions) -> dict[str, int]:
    """How many views each chosen transform makes, in order (the ``views`` its registry entry gives).

    Args:
        options: the chosen transforms and their settings.

    Example: ``view_counts(TtaOptions(transforms=("identity", "crop")))`` is ``{"identity": 1, "crop": 5}``.
    """
    return {t: TRANSFORMS.entry(t).info["views"](options) for t in options.transforms}


def view_index(options: TtaOptions, transform: str) -> int:
    """Position of the first view made by ``transform`` among an image's views.

    Args:
        options: the chosen transforms and their settings.
        transform: one of ``options.transforms``.

    Example: ``view_index(TtaOptions(transforms=("crop", "identity")), "identity")`` is 5.
    """
    counts = view_counts(options)
    return sum(counts[t] for t in options.transforms[: options.transforms.index(transform)])


def parse_transforms(text: str) -> tuple[str, ...]:
    """``--transforms`` as a tuple of names (checked by :class:`TtaOptions`).

    Args:
        text: a comma list.

    Example: ``parse_transforms("identity,hflip,crop")`` is ``("identity", "hflip", "crop")``.
    """
    return tuple(t.strip() for t in text.split(",") if t.strip())


def apply_tta(scorer: Scorer, options: TtaOptions) -> Scorer:
    """``scorer`` with every member scoring the TTA views of each image, reduced by ``options.reduce``.

    Args:
        scorer: the scorer to change (returned, changed in place).
        options: which views, how they are reduced, their seed.

    Example: ``apply_tta(load_scorer("runs/clothes"), TtaOptions(transforms=("identity", "crop")))``.
    """
    scorer.views = TtaViews(options)
    scorer.reduce_views = get_rule(options.reduce, VIEW_REDUCERS)
    scorer.seed = options.seed
    return scorer


@stages_output("out")
@holds_output_lock("out")
def tta(
    model: str | Path | Classifier,
    input: str | Path,
    out: str | Path,
    *,
    options: TtaOptions | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    label_format: str = "name",
    weights: str | Path | None = None,
    runtime: str = "auto",
    resume: bool = False,
    shard: str | Shard | None = None,
    format: str | None = None,
    engine: str | EngineSettings | None = None,
) -> RunResult:
    """Write predictions reduced (``options.reduce``) over the TTA views of every image under ``input``.

    Same CSV, errors CSV, exit codes, ``resume`` and ``shard`` as :func:`cvtool.predict.predict`.

    Args:
        model: a run directory, a ``.keras`` file, ``imagenet:NAME``, an ensemble run directory, or a classifier.
        input: an image file, or a folder searched recursively.
        out: the predictions file to write (``.csv``, ``.jsonl`` or ``.parquet``).
        options: which views and how they are reduced (default: identity and hflip, mean).
        top_k: classes per row (capped at the class count).
        batch_size: images per batch (each brings its views).
        overwrite: replace an existing ``out``.
        quiet: no progress bar or log lines.
        unsafe_load: allow models with Lambda layers or custom code.
        label_format: ``name``, ``wnid`` or ``both``, for ``imagenet:NAME`` models.
        weights: a local weights file (or folder) for an ``imagenet:NAME`` model.
        runtime: what runs the model: ``auto`` (a run's fastest export, else TF), ``tf``, ``tflite``, ``onnx``.
        resume: continue an interrupted run from ``out``'s partial files.
        shard: ``"K/N"``: do only shard K of ``input``.
        format: ``csv``, ``jsonl`` or ``parquet`` (default: from ``out``'s suffix; see :mod:`cvtool.formats`).
        engine: where the scoring runs: ``local`` or ``ray`` (:mod:`cvtool.engines`); None: ``$CVTOOL_ENGINE``.

    Example: ``tta("runs/clothes", "incoming/", "preds.csv", options=TtaOptions(transforms=("identity", "crop")))``.
    """
    options = options or TtaOptions()
    with BatchJob(out, overwrite=overwrite, resume=resume, shard=shard, format=format) as job:
        items = list_images(input)
        scorer = apply_tta(load_scorer(model, unsafe=unsafe_load, weights=weights, runtime=runtime), options)
        return write_predictions(
            scorer,
            items,
            job,
            command="tta",
            top_k=top_k,
            batch_size=batch_size,
            quiet=quiet,
            input=input,
            label_format=label_format,
            engine=engine,
        )
