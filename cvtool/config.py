"""What decides how a model is trained: :class:`TrainConfig`, :class:`FinetuneConfig`, :class:`AugmentConfig`.

Each field is the one declaration of an option: its name (``--image-size`` for
``image_size``), type, default and help text. ``cvtool train`` and ``cvtool
finetune`` build their command-line options from these fields
(:func:`cvtool.cli.config_options`), and a run stores its config in
cvtool.json. Importing this module does not import TensorFlow, so ``--help``
stays instant.

Example::

    from cvtool.config import AugmentConfig, TrainConfig
    cfg = TrainConfig(epochs=20, image_size=96, augment=AugmentConfig(rotation=0.05))
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

HUB_PREFIX = "hub:"  # finetune --backbone hub:HANDLE_OR_PATH


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **cli: Any) -> Any:
    """A config field with its command-line help; ``cli`` holds extra option settings.

    ``cli`` keys: ``flags`` (the option's spellings, default ``--field-name``),
    ``envvar``, ``min``, ``show_default`` (text), and ``resumable``: the option is
    optional on the command line (not given: the field's default, or with
    ``--resume`` the run's stored value) and is the one ``--resume`` applies.
    """
    return field(default=default, default_factory=default_factory, metadata={"help": help, "cli": cli})


@dataclass
class AugmentConfig:
    """Switches for random training-time transforms (0 turns one off); see :mod:`cvtool.augment`."""

    hflip: bool = option(True, "Random horizontal flips.")
    vflip: bool = option(False, "Random vertical flips.")
    rotation: float = option(0.0, "Random rotation, fraction of a full turn (0.05 = 18 degrees); 0 to 0.5.")
    zoom: float = option(0.0, "Random zoom in/out, fraction; 0 to under 1.")
    shift: float = option(0.0, "Random shift, fraction of height/width; 0 to 1.")
    shear: float = option(0.0, "Random shear intensity; 0 to 1.")
    crop: float = option(
        0.0, "Random crop: a window of (1 - CROP) of each side at a random place, resized back; 0 to 0.5."
    )
    contrast: float = option(0.0, "Random contrast factor; 0 to 1.")
    brightness: float = option(0.0, "Random brightness, fraction of the pixel range; 0 to 1.")
    randaugment: float = option(
        0.0,
        "RandAugment (keras.layers.RandAugment, 2 random ops per image) at this strength; 0 = off, "
        "0.5 is Keras' default; 0 to 1.",
    )
    mixup: float = option(0.0, "MixUp alpha (keras.layers.MixUp, soft labels); 0 = off, 0.2 is usual; 0 to 1.")
    cutmix: float = option(
        0.0, "CutMix factor (keras.layers.CutMix, soft labels); 0 = off, 1 is usual; with --mixup, one per batch."
    )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        """Any per-image transform (MixUp and CutMix mix whole batches: :attr:`mixes`)."""
        return any(v for k, v in asdict(self).items() if k not in MIXING)

    @property
    def mixes(self) -> bool:
        """MixUp or CutMix on: training targets become soft labels."""
        return bool(self.mixup or self.cutmix)


MIXING = ("mixup", "cutmix")  # AugmentConfig fields that mix images and labels of a batch
LR_SCHEDULES = ("constant", "cosine", "step")
LR_SCHEDULE_HELP = (
    "constant, cosine (decays to 0 over the phase's epochs) or step (x0.1 at 1/2 and 3/4 of them); per step."
)


@dataclass
class TrainConfig:
    """Everything that decides how a model is trained from scratch; stored in cvtool.json."""

    arch: str = option("small-cnn", "small-cnn, mobilenet_v2, efficientnet_b0 or resnet50 (from scratch).")
    epochs: int = option(12, "Training epochs (default: 12; with --resume, the run's own).", min=1, resumable=True)
    image_size: int | None = option(
        None, "Square input side in pixels (default: 64 for small-cnn, else the network's own)."
    )
    batch_size: int = option(
        32, "Images per training step.", flags=("--batch-size", "-b"), envvar="CVTOOL_TRAIN_BATCH_SIZE", min=1
    )
    lr: float = option(1e-3, "Learning rate.")
    lr_schedule: str = option(
        "cosine",
        LR_SCHEDULE_HELP,
    )
    warmup: float = option(0.0, "Epochs of linear learning-rate warm-up at the start (fractions allowed).", min=0)
    optimizer: str = option("adam", "adam, rmsprop or sgd (momentum 0.9, Nesterov).")
    seed: int = option(42, "Seeds Python, NumPy and TensorFlow: split, shuffling, augmentation, weights.")
    val_split: float = option(0.2, "Fraction held out per class when DATA has no validation/ folder.")
    label_smoothing: float = option(0.0, "Label smoothing: targets y * (1 - F) + F / classes; 0 = off.")
    dropout: float | None = option(
        None, "Dropout before the softmax head (default: 0.5 for small-cnn, after its Dense 512; else 0.2)."
    )
    width: int = option(32, "small-cnn: filters of the first conv block (each next block doubles them).", min=1)
    depth: int = option(3, "small-cnn: conv blocks, each halving the side.", min=1)
    bootstrap: bool = option(
        False, "Train on a bootstrap sample of the training split (drawn with replacement, seeded by --seed)."
    )
    augment: AugmentConfig = option(default_factory=AugmentConfig)  # its fields are options of their own
    checkpoint: str = option(
        "best",
        "RUN/checkpoints/: best (one file, the best epoch), every-epoch, or none. "
        "The resume point (last-epoch-N.keras) is always kept.",
        envvar="CVTOOL_CHECKPOINT",
    )
    monitor: str = option(
        "val_loss", "Metric that picks the best epoch and drives early stopping: val_loss, val_accuracy..."
    )
    patience: int = option(0, "Early stopping: epochs without improvement before stopping (0 = off).", min=0)
    min_delta: float = option(0.0, "Smallest change of --monitor that counts as an improvement.")
    class_weight: str = option("none", "none, or balanced: weight classes by n / (classes * count).")
    loop: str = option("fit", "fit (model.fit) or custom (a tf.GradientTape step in tf.function), same callbacks.")
    deterministic: bool = option(False, "Turn on TensorFlow op determinism (slower).", flags=("--deterministic",))
    mixed_precision: str = option(
        "auto", "auto (on for GPUs with compute capability >= 7.0), on or off (mixed_float16)."
    )
    layout: str = option(
        "auto",
        "How DATA's folders are read: auto, classes (every sub-folder is a class) or splits "
        "(train/, validation/ or val/, test/ holding class folders; other folders ignored).",
    )
    report: bool = option(
        True,
        "Write RUN/report.html: the data, then the curves (rewritten every epoch), config and metrics.",
        flags=("--report/--no-report",),
    )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """The config stored in a run (unknown keys ignored, missing ones default)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("augment"), dict):
            values["augment"] = AugmentConfig(**values["augment"])
        return cls(**values)


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig plus the fine-tuning choices; ``epochs`` is the fine-tune phase's length.

    Fields declared here come first in ``cvtool finetune --help``.
    """

    arch: str = option(
        "mobilenet_v2",
        "mobilenet_v2, mobilenet_v3_small/large, efficientnet_b0..b3, efficientnetv2_b0, resnet50, vgg16, "
        "inception_v3, xception, convnext_tiny; or hub:HANDLE_OR_PATH, a TF-Hub image feature vector used as a "
        "frozen feature extractor (Keras 3 cannot train hub.KerasLayer: only the head is trained).",
        flags=("--backbone",),
    )
    weights: str = option(
        "imagenet",
        "imagenet (downloaded and cached the Keras way), none (random), or PATH to a weights file of "
        "the backbone without its top (offline machines).",
    )
    head_epochs: int = option(5, "Phase 1: epochs of the new head, backbone frozen.", min=0)
    epochs: int = option(
        5,
        "Phase 2: epochs with the top backbone layers unfrozen (default: 5; with --resume, the run's).",
        min=0,
        resumable=True,
    )
    lr: float = option(1e-3, "Learning rate of phase 1 (the head).")
    # train's schedule changed (bench/README.md: default train recipe); finetune's was not re-measured: kept
    lr_schedule: str = option(
        "constant",
        LR_SCHEDULE_HELP,
    )
    fine_tune_lr: float | None = option(None, "Learning rate of phase 2 (default: --lr / 10).", show_default=False)
    unfreeze: int | None = option(
        None, "Phase 2 unfreezes the top N backbone layers (default: use --unfreeze-fraction)."
    )
    unfreeze_fraction: float = option(0.25, "Phase 2 unfreezes this top fraction of layers.")
    dropout: float = option(0.2, "Dropout before the softmax head.")
    cache_features: str = option(
        "auto",
        "Phase 1 on cached features: the frozen backbone runs once per image, the head trains on its outputs. "
        "auto (on when phase 1 has no augmentation and the weights are pretrained), on, or off.",
    )
    image_size: int | None = option(None, "Square input side in pixels (default: the backbone's own; 224 for hub).")

    @property
    def backbone(self) -> str:
        return self.arch

    @property
    def is_hub(self) -> bool:
        return self.arch.startswith(HUB_PREFIX)

    @property
    def pretrained(self) -> bool:
        """Weights with BatchNorm statistics worth keeping (imagenet or a file), as opposed to none."""
        return self.weights != "none"


def option_fields(cls: type) -> list[tuple[str, Any, dict]]:
    """(name, type, settings) of every option of ``cls``: its field metadata and default; nested configs flattened.

    The class's own fields come first (finetune's choices before the inherited ones),
    then the inherited fields in their order. Usage: ``[name for name, _, _ in option_fields(TrainConfig)]``.
    """
    hints = get_type_hints(cls)
    own = list(cls.__dict__.get("__annotations__", {}))
    ordered = sorted(fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own))
    result = []
    for f in ordered:
        nested = _nested(f)
        result += option_fields(nested) if nested else [(f.name, hints[f.name], {**f.metadata, "default": f.default})]
    return result


def from_options(cls: type, values: dict, resume: bool = False):
    """``cls`` built by field name from flat option values (as :func:`option_fields` lists them).

    A value None means the field's default. With ``resume`` only the resumable options count
    (the run's stored config is used): None when none of them was given.

    Example: ``from_options(TrainConfig, {"epochs": 3, "rotation": 0.05})``.
    """
    if resume:
        given = {
            f.name: values[f.name] for f in fields(cls) if _cli(f).get("resumable") and values.get(f.name) is not None
        }
        return cls(**given) if given else None
    kwargs = {}
    for f in fields(cls):
        nested = _nested(f)
        if nested:
            kwargs[f.name] = from_options(nested, values)
        elif values.get(f.name) is not None:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _nested(f) -> type | None:
    """The config class of a field holding a nested config (``augment``), else None."""
    factory = f.default_factory
    return factory if factory is not MISSING and is_dataclass(factory) else None


def _cli(f) -> dict:
    return f.metadata.get("cli", {})
