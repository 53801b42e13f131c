"""`cvtool visualize`: what a convolutional classifier computes, as pictures (Deep Learning with Python, ch. 5).

Two kinds of picture, for each chosen layer (default: one per convolution block,
:func:`default_layers`):

- **activations** of each image: ``DIR/<image>.<layer>.activations.png``, a grid of the
  layer's channels (16 per row, the first ``channels`` of them), each standardised on its
  own and drawn with the viridis colour map; ``<image>`` is the input's relative path
  without its suffix, as ``gradcam`` names its pictures.
- **filter patterns**: ``DIR/<layer>.filters.png``, the images that maximise the mean
  activation of the layer's first ``filters`` channels, found by gradient ascent in pixel
  space from gray noise (``steps`` steps of ``step_size`` pixel levels, RMS), standardised
  and shown as the book shows them. Independent of the images.

``<layer>`` is the layer's path with dots (``backbone.block_1_expand_relu`` for a layer
inside a finetune backbone). The model is loaded by :func:`cvtool.bundle.load_classifier`
(run directories, ``.keras`` files, ``imagenet:NAME``), images by :mod:`cvtool.images`;
a layer inside a nested model is reached as Grad-CAM reaches it (:func:`cvtool.cam.build_tap`).

Example::

    visualize("runs/clothes", "photo.jpg", "viz/", layers="block1_relu2,block2_relu2", filters=8)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvtool.bundle import Classifier, load_classifier
from cvtool.errors import UnusableError, UsageError
from cvtool.locks import holds_output_lock
from cvtool.progress import info, warn

COLUMNS = 16  # channels per row of an activation grid, as in the book
GAP = 2  # pixels between tiles
MIN_TILE = 32  # activation maps smaller than this are enlarged (nearest neighbour) to at least this side
ERRORS_FILE = "errors.csv"


@dataclass
class VisualizeResult:
    """What ``visualize`` did: images done, images that failed, files written (relative to ``out``)."""

    processed: int
    failed: int
    out: Path
    errors: Path
    written: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# --- which layers -------------------------------------------------------------------------------------------------


def default_layers(model) -> list[list[str]]:
    """One layer per convolution block: the last layer of each stretch of one map size that holds a convolution.

    The network is followed in call order (nested models included) up to its
    classifier head; it is cut where the map size changes (a pooling or strided
    convolution starts the next block) and each piece that contains a convolution
    gives its last layer, leaving out padding, pooling and dropout; the 1x1 maps of
    squeeze-and-excitation branches (MobileNetV3, EfficientNet) are not blocks. So small-cnn
    gives ``block1_relu2``, ``block2_relu2`` and ``block3_relu2``; VGG16 the last convolution of each
    block (``block1_conv2`` ...); MobileNetV2 one layer per resolution.
    """
    from cvtool.cam import _flat_layers, _head_start, _spatial
    from cvtool.runtime import keras

    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    skip = (
        keras.layers.ZeroPadding2D,
        keras.layers.MaxPooling2D,
        keras.layers.AveragePooling2D,
        keras.layers.Dropout,
        keras.layers.SpatialDropout2D,
    )
    flat = _flat_layers(model)
    flat = flat[: _head_start(flat)]
    chosen, size, has_conv, last, squeeze = [], None, False, None, False
    for path, layer in flat:
        if type(layer).__name__.startswith("Global"):  # a squeeze-and-excitation branch starts
            squeeze = True
            continue
        here = _spatial(layer)
        if here is None:
            continue
        if squeeze:
            if here != size:
                continue  # the branch's 1x1 maps, multiplied back onto the block's map: not a block of their own
            squeeze = False
        if here != size:
            if has_conv and last is not None:
                chosen.append(last)
            size, has_conv, last = here, False, None
        has_conv = has_conv or isinstance(layer, convs)
        if not isinstance(layer, skip):
            last = path
    if has_conv and last is not None:
        chosen.append(last)
    return chosen


def resolve_layers(model, spec: str | Sequence[str] | None) -> list[list[str]]:
    """Layer paths from a comma list of names (any depth) or ``backbone/NAME`` paths; default :func:`default_layers`."""
    from cvtool.cam import find_target_layer

    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec or [])
    names = [n for n in names if n]
    if names:
        return [find_target_layer(model, name) for name in names]
    layers = default_layers(model)
    if not layers:
        raise UnusableError("the model has no convolution layers to visualize")
    return layers


def layer_label(path: Sequence[str]) -> str:
    """``["backbone", "Conv_1"]`` -> ``backbone.Conv_1`` (file names hold no slashes)."""
    return ".".join(path)


def _layer_model(model, path: Sequence[str]):
    """``model``'s input -> the layer's output (nested models reached as :func:`cvtool.cam.build_tap` does)."""
    from cvtool.cam import build_tap
    from cvtool.runtime import keras

    try:
        tap = build_tap(model, path)
        return keras.Model(tap.inputs, tap.outputs[0])
    except Exception as exc:  # noqa: BLE001 - Keras graph errors: one line for the user
        raise UnusableError(f"cannot reach layer {'/'.join(path)}: {' '.join(str(exc).split())[:200]}") from None


def climb_path(model, path: Sequence[str]) -> list[str]:
    """The layer whose output filter patterns climb for the layer at ``path``: a ReLU's input, else itself.

    The ReLU only cuts the negative part, so maximising its input maximises its output; but a filter
    that is silent (negative) everywhere on the starting image has no gradient through the ReLU and
    would stay a flat grey tile. Small-cnn's ``block3_relu2`` climbs on ``block3_bn2``.
    """
    from cvtool.cam import _layer_at
    from cvtool.runtime import keras

    layer = _layer_at(model, path)
    relu = isinstance(layer, keras.layers.ReLU) or (
        isinstance(layer, keras.layers.Activation) and getattr(layer.activation, "__name__", "") == "relu"
    )
    if not relu:
        return list(path)
    try:
        before = layer.input._keras_history.operation
        _layer_at(model, [*path[:-1], before.name])
    except (AttributeError, ValueError):
        return list(path)
    return [*path[:-1], before.name]


# --- pictures -----------------------------------------------------------------------------------------------------


def grid(tiles: np.ndarray, columns: int) -> np.ndarray:
    """Tiles [n, h, w, 3] uint8 in rows of ``columns``, ``GAP`` black pixels between them."""
    n, h, w = tiles.shape[:3]
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    out = np.zeros((rows * (h + GAP) - GAP, columns * (w + GAP) - GAP, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + GAP) : r * (h + GAP) + h, c * (w + GAP) : c * (w + GAP) + w] = tile
    return out


def standardise(x: np.ndarray, axes) -> np.ndarray:
    """The book's display rule: zero mean, unit std, x64 + 128, clipped to 0..255 (a constant stays 128)."""
    x = x - x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    x = np.where(std > 0, x / np.where(std > 0, std, 1.0), 0.0)
    return np.clip(x * 64.0 + 128.0, 0, 255).astype(np.uint8)


def activation_grid(acts: np.ndarray, channels: int = 64) -> np.ndarray:
    """One image's activations [h, w, c] as an RGB grid of its first ``channels`` channels (0: all).

    Each tile is the channel standardised on its own in viridis, enlarged to at least
    ``MIN_TILE`` pixels when the map is smaller; 16 tiles per row.
    """
    from cvtool.heatmaps import colorize, colormap

    acts = np.asarray(acts, np.float32)
    if channels:
        acts = acts[..., :channels]
    h, w, c = acts.shape
    scale = max(1, math.ceil(MIN_TILE / max(h, w)))
    gray = standardise(acts, axes=(0, 1)).transpose(2, 0, 1)  # [c, h, w]
    cmap = colormap("viridis")
    tiles = np.stack([colorize(g.astype(np.float32) / 255.0, cmap) for g in gray])
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid(tiles, COLUMNS)


def filter_patterns(
    layer_model,
    filters: Sequence[int],
    size: tuple[int, int],
    *,
    steps: int = 30,
    step_size: float = 5.0,
    seed: int = 0,
) -> np.ndarray:
    """Images [n, H, W, 3] (float, pixel units) that maximise each filter's mean activation, by gradient ascent.

    All filters climb at once, one image each. The loss leaves out a 2-cell border of the
    map (where padding dominates), as the book does. Each step moves the image by
    ``step_size`` pixel levels (root mean square over its pixels) along the gradient.
    """
    from cvtool.runtime import tf

    h, w = size

    @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32), tf.TensorSpec([None], tf.int32)])
    def ascend(images, index):
        with tf.GradientTape() as tape:
            tape.watch(images)
            acts = tf.cast(layer_model(images, training=False), tf.float32)
            if acts.shape[1] > 4 and acts.shape[2] > 4:
                acts = acts[:, 2:-2, 2:-2, :]
            chosen = tf.gather(acts, index, axis=3, batch_dims=1)  # [n, h, w]: each image its own filter
            loss = tf.reduce_sum(tf.reduce_mean(chosen, axis=(1, 2)))
        grads = tape.gradient(loss, images)
        rms = tf.sqrt(tf.reduce_mean(tf.square(grads), axis=(1, 2, 3), keepdims=True))
        return images + step_size * tf.math.divide_no_nan(grads, rms)

    rng = np.random.default_rng(seed)
    images = tf.constant(rng.uniform(0.4 * 255, 0.6 * 255, (len(filters), h, w, 3)).astype(np.float32))
    index = tf.constant(np.asarray(filters, np.int32))
    for _ in range(steps):
        images = ascend(images, index)
    return images.numpy()


# --- the command --------------------------------------------------------------------------------------------------


@holds_output_lock("out", folder=True)
def visualize(
    model: str | Path | Classifier,
    input: str | Path,
    out: str | Path,
    *,
    layers: str | Sequence[str] | None = None,
    filters: int = 16,
    channels: int = 64,
    steps: int = 30,
    step_size: float = 5.0,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    weights: str | Path | None = None,
) -> VisualizeResult:
    """Write activation grids for each image under ``input`` and filter patterns for each layer into ``out``.

    Args:
        model: a run directory, ``.keras`` file, ``imagenet:NAME`` or a loaded classifier.
        input: an image file or a folder (searched recursively; bad files go to ``out/errors.csv``).
        out: the folder for the pictures.
        layers: comma list of layer names (or ``backbone/NAME``); default one per convolution block.
        filters: filter patterns per layer (its first ``filters`` channels); 0 writes none.
        channels: channels per activation grid (the first ones); 0 shows all.
        steps, step_size: the gradient ascent (pixel levels per step, RMS).
        batch_size: images per forward pass.
        overwrite: replace pictures that exist.

    Usage: ``visualize("runs/a", "photos/cat.jpg", "viz/", filters=8)``.
    """
    from cvtool.batches import decode_stream
    from cvtool.gradcam import output_bases
    from cvtool.images import list_images, load_image
    from cvtool.outputs import path_cell, save_image, write_csv

    for name, value in (("--filters", filters), ("--channels", channels), ("--steps", steps)):
        if value < 0:
            raise UsageError(f"{name} must not be negative")
    if not step_size > 0 or step_size == float("inf"):  # NaN and infinity too
        raise UsageError(f"--step-size must be a positive number, got {step_size}")
    out_dir = Path(out)
    items = list_images(input, exclude=out_dir)
    if not items:
        warn(f"no images found in {input}")
    classifier = model if isinstance(model, Classifier) else load_classifier(model, unsafe=unsafe_load, weights=weights)
    if getattr(classifier, "features", None) is not None:
        raise UnusableError(f"{classifier.source} is a head on TF-Hub features: it has no image layers to visualize")
    paths = resolve_layers(classifier.model, layers)
    info(f"layers: {', '.join('/'.join(p) for p in paths)}", quiet)
    bases = output_bases(items)
    names = {layer_label(p): p for p in paths}
    planned = [f"{bases[item.rel]}.{label}.activations.png" for item in items for label in names]
    planned += [f"{label}.filters.png" for label in names] if filters else []
    if not overwrite:
        for rel in planned:
            if (out_dir / rel).exists():
                raise UsageError(f"{out_dir / rel} already exists; pass --overwrite to replace it")
    from PIL import Image

    size = classifier.image_size
    layer_models = {label: _layer_model(classifier.model, path) for label, path in names.items()}
    written: list[str] = []
    for label, path in names.items():
        if not filters:
            break
        climb = climb_path(classifier.model, path)
        layer_model = layer_models[label] if climb == list(path) else _layer_model(classifier.model, climb)
        count = int(layer_model.outputs[0].shape[-1])
        patterns = filter_patterns(layer_model, range(min(filters, count)), size, steps=steps, step_size=step_size)
        picture = grid(standardise(patterns, axes=(1, 2, 3)), math.ceil(math.sqrt(len(patterns))))
        written.append(str(save_image(Image.fromarray(picture), out_dir / f"{label}.filters.png").relative_to(out_dir)))
        info(f"{label}: {len(patterns)} filter patterns", quiet)
    failures = []
    processed = 0
    pending: list = []

    def flush() -> None:
        if not pending:
            return
        x = np.stack([img for _, img in pending]).astype(np.float32)
        for label, layer_model in layer_models.items():
            acts = np.asarray(layer_model(x, training=False), np.float32)
            for (item, _), a in zip(pending, acts):
                rel = f"{bases[item.rel]}.{label}.activations.png"
                save_image(Image.fromarray(activation_grid(a, channels)), out_dir / rel)
                written.append(rel)
        pending.clear()

    for item, result in decode_stream(items, lambda it: load_image(it.path, size)):
        if not isinstance(result, np.ndarray):
            failures.append(result)
            warn(f"skipped {path_cell(item.rel)}: {result.reason}")
            continue
        pending.append((item, result))
        processed += 1
        if len(pending) >= batch_size:
            flush()
    flush()
    errors = out_dir / ERRORS_FILE
    if failures or errors.exists():
        write_csv(errors, ["path", "error"], ((path_cell(f.item.rel), f.reason) for f in failures))
    return VisualizeResult(processed, len(failures), out_dir, errors, written)


__all__ = ["visualize", "default_layers", "resolve_layers", "activation_grid", "filter_patterns", "VisualizeResult"]
