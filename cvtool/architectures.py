"""Network architectures: the cookbook's small CNN and classifiers on keras.applications backbones.

(Not the `cvtool models` command, which lists what can be given as MODEL: that is :mod:`cvtool.catalog`.
The backbones themselves are registered in :mod:`cvtool.backbones`.)

Every classifier cvtool builds takes RGB pixels in [0, 255] at its input and
carries its own preprocessing (:class:`cvtool.layers.Preprocess`), so a saved
model needs nothing but decoded, resized pixels.
"""

from __future__ import annotations

import math

from cvtool.backbones import SCRATCH_ARCHS, Backbone, get_backbone
from cvtool.errors import UsageError
from cvtool.layers import Preprocess
from cvtool.runtime import keras

layers = keras.layers


def image_input(image_size: tuple[int, int]) -> keras.KerasTensor:
    return keras.Input(shape=(*image_size, 3), name="image")


def small_cnn(
    num_classes: int,
    image_size: tuple[int, int],
    dropout: float = 0.5,
    *,
    width: int = 32,
    depth: int = 3,
) -> keras.Model:
    """A VGG-like net after the cookbook's: [Conv-BN-ReLU x2, MaxPool, Dropout 0.25] blocks, Dense 512.

    ``width``: filters of the first block (each next block doubles them); ``depth``: the number of
    blocks (each halves the side, so at most log2 of the side). The cookbook has two blocks; the
    default is three (32, 64, 128 filters), which gained 3-4 points of validation accuracy on
    clothing-small at 64 px for about 15% more time per epoch (bench/README.md).

    BatchNormalization comes between each Conv/Dense and its ReLU (the cookbook puts it after the ReLU),
    so that it folds into the layer's weights on export: after the ReLU, units that never fire get
    near-zero variance and huge scales, which int8 quantization cannot hold beside the live ones
    (docs/export.md). Models saved with the old order keep it (their graph is in model.keras).

    BatchNormalization uses momentum 0.9 (not Keras' 0.99) so that its moving
    statistics catch up within the few hundred steps of a small data set;
    otherwise validation accuracy lags far behind training accuracy.
    """
    inputs = image_input(image_size)
    x = Preprocess("rescale", name="preprocess")(inputs)
    depth = max(1, min(depth, int(math.log2(max(2, min(image_size))))))
    for i, filters in enumerate((width * 2**b for b in range(depth)), start=1):
        for j in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn{j}")(x)
            x = layers.Activation("relu", name=f"block{i}_relu{j}")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
        x = layers.Dropout(0.25, name=f"block{i}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, use_bias=False, name="fc")(x)
    x = layers.BatchNormalization(momentum=0.9, name="fc_bn")(x)
    x = layers.Activation("relu", name="fc_relu")(x)
    x = layers.Dropout(dropout, name="fc_dropout")(x)
    outputs = classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name="small_cnn")


def classifier_head(x, num_classes: int):
    """Dense softmax, kept in float32 so mixed precision never rounds probabilities."""
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def backbone_classifier(
    backbone: Backbone,
    num_classes: int,
    image_size: tuple[int, int],
    weights: str | None = None,
    dropout: float = 0.2,
    backbone_training: bool | None = None,
) -> keras.Model:
    """Input -> Preprocess -> backbone (nested model named 'backbone') -> pooling -> dropout -> softmax.

    ``backbone_training=False`` calls the backbone in inference mode for good
    (fine-tuning: its BatchNormalization layers never use batch statistics).
    """
    net = backbone.build(image_size, weights=weights)
    net.name = "backbone"
    inputs = image_input(image_size)
    x = Preprocess(backbone.preprocess, name="preprocess")(inputs)
    x = net(x) if backbone_training is None else net(x, training=backbone_training)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = classifier_head(x, num_classes)
    return keras.Model(inputs, outputs, name=f"{backbone.name}_classifier")


def build_scratch(
    arch: str,
    num_classes: int,
    image_size: tuple[int, int],
    *,
    dropout: float | None = None,
    width: int = 32,
    depth: int = 3,
) -> keras.Model:
    """A randomly initialised classifier for ``cvtool train --arch`` (``width`` and ``depth``: small-cnn's).

    ``dropout`` None: 0.5 for small-cnn, 0.2 for the backbone networks.
    """
    if arch == "small-cnn":
        return small_cnn(num_classes, image_size, 0.5 if dropout is None else dropout, width=width, depth=depth)
    if arch not in SCRATCH_ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; choose from {', '.join(SCRATCH_ARCHS)}")
    model = backbone_classifier(
        get_backbone(arch), num_classes, image_size, dropout=0.2 if dropout is None else dropout
    )
    set_batchnorm_momentum(model, 0.9)
    return model


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> None:
    """Faster-adapting BN statistics for training from scratch on small data (see small_cnn)."""
    for layer in all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = momentum


def all_layers(model):
    """Every layer, descending into nested models (a finetune backbone)."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)
