"""Ready-made ImageNet classifiers: ``imagenet:NAME`` wherever a MODEL goes.

``load_imagenet("imagenet:resnet50")`` builds the full ``keras.applications``
network with its 1,000-class head (``include_top=True``) at its own input size,
puts its ``preprocess_input`` in front as cvtool's :class:`~cvtool.layers.Preprocess`
layer (so it takes RGB pixels in [0, 255] like every cvtool model) and labels
its outputs with the ImageNet class names shipped in ``cvtool/resources``.

The model is one flat Keras graph (input -> preprocess -> the application's own
layers), so its convolution layers are reachable by name, e.g. for Grad-CAM.

Weights, first found wins:

1. ``weights`` (``--weights PATH``), else the ``CVTOOL_IMAGENET_WEIGHTS``
   environment variable: a weights file (``.h5`` as Keras downloads it,
   ``.weights.h5`` or ``.keras``), or a folder holding ``NAME.weights.h5``,
   ``NAME.h5`` or ``NAME.keras`` per network (a folder serves several models).
2. Keras' own download and cache (``~/.keras/models``, or ``$KERAS_HOME/models``).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cvtool.errors import UnusableError, UsageError
from cvtool.registry import Registry

PREFIX = "imagenet:"
WEIGHTS_ENV = "CVTOOL_IMAGENET_WEIGHTS"
CLASS_INDEX_FILE = "imagenet_class_index.json"
NUM_CLASSES = 1000
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".keras")

# Each network's module in keras.applications (its preprocess_input lives there).
KERAS_MODULES: dict[str, str] = {
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_small": "mobilenet_v3",
    "mobilenet_v3_large": "mobilenet_v3",
    "efficientnet_b0": "efficientnet",
    "efficientnet_b1": "efficientnet",
    "efficientnet_b2": "efficientnet",
    "efficientnet_b3": "efficientnet",
    "efficientnetv2_b0": "efficientnet_v2",
    "resnet50": "resnet50",
    "vgg16": "vgg16",
    "inception_v3": "inception_v3",
    "xception": "xception",
    "convnext_tiny": "convnext",
}
NAMES: tuple[str, ...] = tuple(KERAS_MODULES)


def is_imagenet_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def network_name(spec: str) -> str:
    """``imagenet:resnet50`` -> ``resnet50``; unknown names are a usage error (exit 2)."""
    name = spec[len(PREFIX) :].strip().lower().replace("-", "_")
    if name not in KERAS_MODULES:
        raise UsageError(f"unknown ImageNet model {spec!r}; choose from {', '.join(PREFIX + n for n in NAMES)}")
    return name


@lru_cache(maxsize=1)
def class_index() -> tuple[tuple[str, str], ...]:
    """The 1,000 ImageNet classes in model output order, as (WordNet id, readable name)."""
    text = resources.files("cvtool").joinpath("resources", CLASS_INDEX_FILE).read_text(encoding="utf-8")
    raw = json.loads(text)
    return tuple((raw[str(i)][0], raw[str(i)][1]) for i in range(NUM_CLASSES))


def class_names() -> list[str]:
    return [name for _, name in class_index()]


def wnids() -> list[str]:
    return [wnid for wnid, _ in class_index()]


def describe(name: str) -> dict:
    """What ``cvtool models`` shows for one network, without building it."""
    from cvtool.backbones import BACKBONES

    backbone = BACKBONES[name]
    return {
        "model": PREFIX + name,
        "keras": f"keras.applications.{backbone.constructor}",
        "image_size": [backbone.size, backbone.size],
        "preprocess": backbone.preprocess,
        "classes": NUM_CLASSES,
    }


def weights_file(name: str, weights: str | os.PathLike | None = None) -> Path | None:
    """The local weights file for network ``name``: ``weights``, else $CVTOOL_IMAGENET_WEIGHTS, else None (Keras)."""
    given, origin = weights, "--weights"
    if given is None or str(given) == "":
        given, origin = os.environ.get(WEIGHTS_ENV) or None, WEIGHTS_ENV
    if given is None:
        return None
    path = Path(given).expanduser()
    if path.is_dir():
        for suffix in WEIGHT_SUFFIXES:
            if (path / f"{name}{suffix}").is_file():
                return path / f"{name}{suffix}"
        expected = " or ".join(f"{name}{s}" for s in WEIGHT_SUFFIXES)
        raise UnusableError(f"{origin} folder {path} has no weights for {PREFIX}{name} (expected {expected})")
    if not path.is_file():
        raise UsageError(f"{origin}: weights file not found: {path}")
    return path


def build_model(name: str, weights: str | os.PathLike | None = None):
    """The Keras model: input 'image' (RGB 0-255) -> Preprocess -> the full application with its head.

    ``weights`` is None (random), "imagenet" (Keras download/cache) or a local file.
    """
    from cvtool.architectures import image_input
    from cvtool.backbones import BACKBONES
    from cvtool.layers import Preprocess
    from cvtool.runtime import keras

    backbone = BACKBONES[name]
    inputs = image_input((backbone.size, backbone.size))
    x = Preprocess(backbone.preprocess, name="preprocess")(inputs)
    ctor = getattr(keras.applications, backbone.constructor)
    return ctor(
        include_top=True,
        weights=None if weights is None else str(weights),
        input_tensor=x,
    )


def load_imagenet(spec: str, weights: str | os.PathLike | None = None):
    """A :class:`cvtool.bundle.Classifier` for ``imagenet:NAME`` with the 1,000 ImageNet class names."""
    from cvtool.backbones import BACKBONES
    from cvtool.bundle import Classifier

    name = network_name(spec)
    local = weights_file(name, weights)
    try:
        model = build_model(name, local if local is not None else "imagenet")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - download failure, bad file: one line each
        text = " ".join(str(exc).split())
        if local is not None:
            raise UnusableError(
                f"cannot load weights {local} into {spec}: {type(exc).__name__}: {text[:200]} "
                f"(it must hold the full {name} network with its 1000-class top, as Keras saves it)"
            ) from None
        reason = text.split(" -- ")[-1][:200]  # Keras: "URL fetch failure on URL: None -- [Errno -2] ..."
        cache = Path(os.environ.get("KERAS_HOME", "~/.keras")) / "models"
        raise UnusableError(
            f"no ImageNet weights for {spec} ({reason}); offline? put the file Keras downloads "
            f"into {cache}, or pass --weights FILE, or set {WEIGHTS_ENV} to a weights file or a folder of NAME.h5"
        ) from None
    size = BACKBONES[name].size
    meta = {
        "source": "imagenet",
        "model": name,
        "keras": f"keras.applications.{BACKBONES[name].constructor}",
        "class_names": class_names(),
        "wnids": wnids(),
        "image_size": [size, size],
        "preprocess": BACKBONES[name].preprocess,
        "weights": str(local) if local is not None else "imagenet",
    }
    return Classifier(model=model, class_names=class_names(), image_size=(size, size), meta=meta, source=spec)


# How a CSV names the classes of an ``imagenet:NAME`` model (``--label-format``): label(wnid, name).
LABEL_FORMATS = Registry("--label-format")


@LABEL_FORMATS.register("name", help="golden_retriever", needs_wnids=False)
def _by_name(wnid: str, name: str) -> str:
    return name


@LABEL_FORMATS.register("wnid", help="n02099601", needs_wnids=True)
def _by_wnid(wnid: str, name: str) -> str:
    return wnid


@LABEL_FORMATS.register("both", help="n02099601 golden_retriever, as ImageNet's synset_words.txt", needs_wnids=True)
def _by_both(wnid: str, name: str) -> str:
    return f"{wnid} {name}"


def check_label_format(label_format: str) -> str:
    """``label_format`` if it is registered in :data:`LABEL_FORMATS`, else a usage error (exit 2).

    Args:
        label_format: the ``--label-format`` given.

    Example: ``check_label_format("wnid")``.
    """
    LABEL_FORMATS.entry(label_format)
    return label_format


def label_names(class_names_: list[str], meta: dict, label_format: str = "name") -> list[str]:
    """Class labels as a CSV shows them, in the format ``label_format`` (see :data:`LABEL_FORMATS`).

    Args:
        class_names_: the model's class names.
        meta: the model's metadata (``wnids`` for ``imagenet:NAME`` models).
        label_format: ``name`` (golden_retriever), ``wnid`` (n02099601) or ``both`` ("n02099601 golden_retriever").

    Example: ``label_names(classifier.class_names, classifier.meta, "wnid")``.
    """
    entry = LABEL_FORMATS.entry(label_format)
    if not entry.info["needs_wnids"]:
        return [entry.func("", n) for n in class_names_]
    ids = meta.get("wnids")
    if not ids or len(ids) != len(class_names_):
        raise UsageError(f"--label-format {label_format} needs a model with WordNet ids (an {PREFIX}NAME model)")
    return [entry.func(w, n) for w, n in zip(ids, class_names_)]
