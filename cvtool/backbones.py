"""The keras.applications networks cvtool knows: name, constructor, preprocessing mode, native size.

A plain registry without TensorFlow imports, so listing it (``cvtool models``,
``--help`` texts) stays instant; :meth:`Backbone.build` imports Keras when a
network is really built.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvtool.errors import UsageError


@dataclass(frozen=True)
class Backbone:
    """A keras.applications network, its preprocessing mode, native input size and smallest input side."""

    name: str
    constructor: str  # attribute of keras.applications
    preprocess: str  # Preprocess mode
    size: int
    min_size: int = 32  # keras.applications refuses smaller inputs ("Input size must be at least ...")

    def build(self, image_size: tuple[int, int], weights: str | None = None, include_top: bool = False, **kwargs):
        """The keras.applications model; networks with preprocess "none" normalise 0-255 pixels inside."""
        import cvtool.runtime  # noqa: F401 - quiet TensorFlow import
        from cvtool.runtime import keras

        ctor = getattr(keras.applications, self.constructor)
        return ctor(include_top=include_top, weights=weights, input_shape=(*image_size, 3), **kwargs)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("mobilenet_v2", "MobileNetV2", "tf", 224),
        Backbone("mobilenet_v3_small", "MobileNetV3Small", "none", 224),
        Backbone("mobilenet_v3_large", "MobileNetV3Large", "none", 224),
        Backbone("efficientnet_b0", "EfficientNetB0", "none", 224),
        Backbone("efficientnet_b1", "EfficientNetB1", "none", 240),
        Backbone("efficientnet_b2", "EfficientNetB2", "none", 260),
        Backbone("efficientnet_b3", "EfficientNetB3", "none", 300),
        Backbone("efficientnetv2_b0", "EfficientNetV2B0", "none", 224),
        Backbone("resnet50", "ResNet50", "caffe", 224),
        Backbone("vgg16", "VGG16", "caffe", 224),
        Backbone("inception_v3", "InceptionV3", "tf", 299, min_size=75),
        Backbone("xception", "Xception", "tf", 299, min_size=71),
        Backbone("convnext_tiny", "ConvNeXtTiny", "none", 224),
    )
}

SCRATCH_ARCHS = ("small-cnn", "mobilenet_v2", "efficientnet_b0", "resnet50")
SMALL_CNN_SIZE = 64
MIN_IMAGE_SIZE = 8  # small-cnn: its blocks (each a 2x pooling) are capped at log2 of the side


def default_image_size(arch: str) -> int:
    """The input side a run of ``arch`` uses unless ``--image-size`` says otherwise."""
    return SMALL_CNN_SIZE if arch == "small-cnn" else get_backbone(arch).size


def min_image_size(arch: str) -> int:
    """The smallest square side ``arch`` takes (keras.applications' own minimum; 8 for small-cnn)."""
    backbone = BACKBONES.get(arch)
    return backbone.min_size if backbone is not None else MIN_IMAGE_SIZE


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}") from None
