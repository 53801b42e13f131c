"""Class activation maps: one shared gradient computation, small per-method weightings.

:class:`CamModel` does the shared work (find the target layer, build a model
that exposes its activations without Keras' "Graph disconnected" pitfall, run
a whole batch forward and backward in one tape, each image with its own target
class). A method is a small function that turns activations ``A`` and
gradients ``dy/dA`` ([batch, h, w, channels]) into channel weights
([batch, channels]); the map is ``relu(sum_k weight_k * A_k)``, scaled so that
its maximum is 1::

    cams = CamModel(load_classifier("runs/clothes"), method="gradcam++")
    result = cams.compute(images_uint8)            # top-1 class of each image
    result.maps[0, 0]                              # [h, w] float32 in [0, 1]

``guided-gradcam`` (the paper's Guided Grad-CAM) multiplies the Grad-CAM map,
upsampled to the model's input size, by the guided-backpropagation saliency of
the image (:mod:`cvtool.guided_backprop`): its maps have the input's resolution.

The class score differentiated is the logit (the input of the final softmax)
when the model ends in a softmax, as in the Grad-CAM paper: a saturated
probability of 1.0 has no gradient left in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cvtool.bundle import Classifier
from cvtool.errors import UnusableError, UsageError
from cvtool.registry import Registry

# --- the methods: channel weights from activations and gradients -------------------------------------------------

# Every CAM method (``--method``); TensorFlow is imported when a method runs, so ``--help`` can read this table.
METHODS = Registry("--method")
# Grad-CAM++ by default: on the default small-cnn (Flatten head after max pooling) plain Grad-CAM's mean
# gradients summed to nothing positive for 13-23% of clothing-small's validation photos (blank overlays),
# and Grad-CAM++ scored higher on the insertion metric (docs/gradcam.md).
DEFAULT_METHOD = "gradcam++"


@METHODS.register("gradcam", help="mean gradient per channel")
def gradcam_weights(acts, grads):
    """Grad-CAM (Selvaraju et al.): the spatial mean of the gradients."""
    from cvtool.runtime import tf

    return tf.reduce_mean(grads, axis=(1, 2))


@METHODS.register("gradcam++", help="positive gradients weighted per pixel")
def gradcam_plus_plus_weights(acts, grads):
    """Grad-CAM++ (Chattopadhyay et al.): positive gradients weighted per pixel by alpha."""
    from cvtool.runtime import tf

    g2 = tf.square(grads)
    g3 = g2 * grads
    sum_acts = tf.reduce_sum(acts, axis=(1, 2), keepdims=True)
    denom = 2.0 * g2 + sum_acts * g3
    alpha = tf.where(tf.not_equal(denom, 0.0), g2 / tf.where(tf.not_equal(denom, 0.0), denom, 1.0), 0.0)
    return tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2))


@METHODS.register("positive-gradients", aliases=("guided",), help="positive gradients on positive activations")
def positive_gradients_weights(acts, grads):
    """The cookbook's "guided" weighting: only positive gradients on positive activations count.

    (Not the paper's Guided Grad-CAM, which is ``guided-gradcam``; ``guided`` stays as an alias.)
    """
    from cvtool.runtime import tf

    keep = tf.cast(acts > 0, grads.dtype) * tf.cast(grads > 0, grads.dtype)
    return tf.reduce_mean(keep * grads, axis=(1, 2))


@METHODS.register(
    "guided-gradcam",
    help="Grad-CAM upsampled x guided backpropagation, at the model's input resolution (Selvaraju et al.)",
    guided_backprop=True,
)
def guided_gradcam_weights(acts, grads):
    """Guided Grad-CAM: Grad-CAM's weights; :class:`CamModel` multiplies the upsampled map by the
    guided-backpropagation saliency of the image (:mod:`cvtool.guided_backprop`)."""
    return gradcam_weights(acts, grads)


def get_method(name: str) -> Callable:
    """The channel-weights function of the CAM method ``name``; an unknown name is a usage error (exit 2).

    Args:
        name: a name in :data:`METHODS`.

    Example: ``get_method("gradcam++")(acts, grads)``.
    """
    return METHODS.get(name)


# --- finding the target layer -------------------------------------------------------------------------------------


def _is_model(layer) -> bool:
    from cvtool.runtime import keras

    return isinstance(layer, keras.Model)


def _chain(model) -> list:
    """The model's layers in call order, without input layers."""
    from cvtool.runtime import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError, TypeError):
        return None


def find_target_layer(model, name: str | None = None) -> list[str]:
    """Path of layer names from ``model`` down to the target layer, e.g. ``["backbone", "out_relu"]``.

    Default: the output of the last convolution block, as in the Grad-CAM
    paper and Keras' own example: the last convolution before the classifier
    head (a global pooling whose map never comes back), followed through the layers after it that keep its map (batch
    norm, activations, residual adds, concatenations) up to the first dropout
    or pooling that shrinks the map. So small-cnn's ``block3_relu2`` (not ``block3_dropout``,
    a map of half the resolution), MobileNetV2's ``out_relu``, VGG16's
    ``block5_conv3``; a nested model (a finetune backbone) is searched too.
    A model without convolutions falls back to its last layer with a 4-D
    output. ``name`` may be a plain layer name, found at any depth, or a path
    ``backbone/Conv_1``.
    """
    if name:
        path = _find_named(model, name.split("/")) if "/" in name else _find_anywhere(model, name)
        if path is None:
            hint = ", ".join("/".join(p) for p in _conv_paths(model)[-5:])
            raise UsageError(f"no layer named {name!r} in the model; last 4-D layers: {hint or 'none'}")
        layer = _layer_at(model, path)
        if _output_rank(layer) != 4:
            raise UsageError(f"--layer {name}: output is not 4-D [batch, height, width, channels]")
        return path
    block = _last_conv_block(model)
    if block is not None:
        return block
    paths = _conv_paths(model)
    if not paths:
        raise UnusableError("the model has no layer with a 4-D output (not a convolutional network?)")
    return paths[-1]


def _flat_layers(model, prefix: Sequence[str] = ()) -> list[tuple[list[str], object]]:
    """(path, layer) of every layer in call order, a nested model's inner layers in place of the model."""
    out = []
    for layer in _chain(model):
        if _is_model(layer):
            out += _flat_layers(layer, [*prefix, layer.name])
        else:
            out.append(([*prefix, layer.name], layer))
    return out


def _spatial(layer) -> tuple | None:
    """(height, width) of a 4-D output, else None."""
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError, TypeError):
        return None
    return shape[1:3] if len(shape) == 4 else None


def _last_conv_block(model) -> list[str] | None:
    """The path of the last convolution block's output (see :func:`find_target_layer`), or None."""
    from cvtool.runtime import keras

    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    stops = (keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianDropout)
    flat = _flat_layers(model)
    head = _head_start(flat)
    starts = [i for i, (_, layer) in enumerate(flat[:head]) if isinstance(layer, convs) and _spatial(layer)]
    if not starts:
        return None
    end, size = starts[-1], _spatial(flat[starts[-1]][1])
    for j in range(end + 1, head):
        layer = flat[j][1]
        if isinstance(layer, stops) or _spatial(layer) != size:  # dropout, or pooling that shrinks the map
            break
        end = j
    return flat[end][0]


def _head_start(flat: list) -> int:
    """Index of the global pooling that starts the classifier head, else ``len(flat)``.

    That is the first global pooling whose input's map size never comes back
    (a squeeze-and-excitation block's pooling is multiplied back onto its map;
    MobileNetV3's head pools, then runs 1x1 convolutions on the 1x1 map).
    """
    for i, (_, layer) in enumerate(flat):
        if not type(layer).__name__.startswith("Global"):
            continue
        try:
            size_in = tuple(layer.input.shape)[1:3]
        except (AttributeError, ValueError, TypeError):
            continue
        if not any(_spatial(later) == size_in for _, later in flat[i + 1 :]):
            return i
    return len(flat)


def _conv_paths(model, prefix: Sequence[str] = ()) -> list[list[str]]:
    """Paths of all layers with a 4-D output, in call order (a nested model's inner layers before itself)."""
    paths = []
    for layer in _chain(model):
        if _is_model(layer):
            paths += _conv_paths(layer, [*prefix, layer.name])
        if _output_rank(layer) == 4 and not _is_model(layer):
            paths.append([*prefix, layer.name])
    return paths


def _find_anywhere(model, name: str, prefix: Sequence[str] = ()) -> list[str] | None:
    for layer in _chain(model):
        if layer.name == name:
            return [*prefix, name]
    for layer in _chain(model):
        if _is_model(layer):
            found = _find_anywhere(layer, name, [*prefix, layer.name])
            if found:
                return found
    return None


def _find_named(model, parts: Sequence[str]) -> list[str] | None:
    try:
        _layer_at(model, parts)
    except ValueError:
        return None
    return list(parts)


def _layer_at(model, path: Sequence[str]):
    layer = model
    for part in path:
        layer = layer.get_layer(part)
    return layer


# --- the gradient model -------------------------------------------------------------------------------------------


def build_tap(model, path: Sequence[str], before_head: bool = False):
    """A Keras model: ``model``'s input -> [target layer output, model output (or the head's input)].

    A target inside a nested model has no tensor in the outer graph (asking
    for it is Keras' "Graph disconnected" error), so the outer layers are
    re-traced in order on a fresh input, with the nested model replaced by a
    tap of its own. That needs the levels above the target to be chains of
    single-input layers, which Sequential models and cvtool's are; the
    result is checked against the model itself by :class:`CamModel`.
    Sequential models are always re-traced: a loaded one can hold two graphs
    (built at construction and at loading), and mixing their tensors gives a
    model whose outputs are not connected for gradients.
    """
    from cvtool.runtime import keras

    if len(path) == 1 and not isinstance(model, keras.Sequential):
        target = model.get_layer(path[0]).output
        out = model.layers[-1].input if before_head else model.outputs[0]
        return keras.Model(model.inputs, [target, out])
    spec = model.inputs[0]
    x = inputs = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype)
    target = None
    layers = _chain(model)
    for i, layer in enumerate(layers):
        if before_head and i == len(layers) - 1:
            break
        if layer.name == path[0] and len(path) > 1:
            target, x = build_tap(layer, path[1:])(x)
        else:
            x = layer(x)
            if layer.name == path[0]:
                target = x
    return keras.Model(inputs, [target, x])


def _softmax_head(model):
    """The final layer when it is a softmax (Dense or Activation) whose input holds the logits, else None."""
    from cvtool.runtime import keras

    head = model.layers[-1]
    try:
        is_output = head.output is model.outputs[0]
    except (AttributeError, ValueError):
        return None
    if not is_output or getattr(head, "activation", None) is not keras.activations.softmax:
        return None
    if isinstance(head, (keras.layers.Dense, keras.layers.Activation)):
        return head
    return None


@dataclass
class CamResult:
    """Maps for a batch: ``maps`` [N, K, h, w] in [0, 1], ``classes`` and ``scores`` [N, K], ``probs`` [N, C]."""

    maps: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    probs: np.ndarray


class CamModel:
    """Class activation maps for a :class:`~cvtool.bundle.Classifier`, one method, one target layer."""

    def __init__(self, classifier: Classifier, layer: str | None = None, method: str = DEFAULT_METHOD):
        if getattr(classifier, "features", None) is not None:
            raise UnusableError(
                f"Grad-CAM needs a Keras image model, but {classifier.source} is a Keras head on the feature vectors "
                "of a TF-Hub backbone (finetune --backbone hub:...), which has no image layers to explain"
            )
        self.classifier = classifier
        entry = METHODS.entry(method)
        self.method_name = entry.name  # an alias (guided) gives its method's name
        self.method = entry.func
        self.guided = bool(entry.info.get("guided_backprop"))
        model = classifier.model
        self.path = find_target_layer(model, layer)
        self.head = _softmax_head(model)
        try:
            self.tap = build_tap(model, self.path, before_head=self.head is not None)
        except Exception as exc:  # noqa: BLE001 - Keras graph errors: one line for the user
            raise UnusableError(f"cannot build a gradient model for layer {self.layer_name}: {exc}") from None
        self.guided_tap = None
        if self.guided:
            from cvtool.guided_backprop import guided_clone

            try:
                self.guided_tap = build_tap(guided_clone(model), self.path, before_head=self.head is not None)
            except Exception as exc:  # noqa: BLE001 - Keras cloning errors: one line for the user
                raise UnusableError(f"cannot build a guided-backpropagation copy of the model: {exc}") from None
        self._fns: dict = {}
        self._check_tap()

    @property
    def layer_name(self) -> str:
        return "/".join(self.path)

    def _scores(self, feats):
        """(logits to differentiate, probabilities) from the tap's second output."""
        from cvtool.runtime import tf

        if self.head is None:
            out = tf.cast(feats, tf.float32)
            return out, out
        from cvtool.runtime import keras

        if isinstance(self.head, keras.layers.Dense):
            feats = tf.cast(feats, self.head.kernel.dtype)
            logits = tf.matmul(feats, self.head.kernel)
            if self.head.use_bias:
                logits = logits + self.head.bias
        else:
            logits = feats
        logits = tf.cast(logits, tf.float32)
        return logits, tf.nn.softmax(logits)

    def _check_tap(self) -> None:
        """The re-traced model must compute what the model computes (it may not, for exotic graphs)."""
        h, w = self.classifier.image_size
        x = np.random.default_rng(0).uniform(0, 255, (2, h, w, 3)).astype(np.float32)
        expected = np.asarray(self.classifier.model(x, training=False), dtype=np.float32)
        from cvtool.runtime import tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            acts, feats = self.tap(x, training=False)
            logits, got = self._scores(feats)
        grads = tape.gradient(logits, acts)
        if grads is None or not np.allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-4):
            raise UnusableError(
                f"cannot route gradients to layer {self.layer_name}: the model around it is not a simple chain "
                "of layers; pass --layer naming another layer"
            )
        if self.guided_tap is not None:
            with tf.GradientTape() as tape:
                tape.watch(x)
                _, got = self._scores(self.guided_tap(x, training=False)[1])
            if tape.gradient(got, x) is None or not np.allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-4):
                raise UnusableError("the guided-backpropagation copy of the model does not compute what it computes")

    def _function(self, k: int, by_rank: bool):
        from cvtool.runtime import tf

        key = (k, by_rank)
        if key in self._fns:
            return self._fns[key]
        method = self.method

        def compute(images, fixed):
            with tf.GradientTape(persistent=k > 1) as tape:
                acts, feats = self.tap(images, training=False)
                acts = tf.cast(acts, tf.float32)
                logits, probs = self._scores(feats)
                if by_rank:
                    targets = tf.math.top_k(probs, k=k).indices
                else:
                    targets = fixed
                picked = [tf.reduce_sum(tf.gather(logits, targets[:, j], batch_dims=1)) for j in range(k)]
            saliency = self._guided_saliency(images, targets, k) if self.guided_tap is not None else None
            maps = []
            for j in range(k):
                # Images are independent in inference mode, so the gradient of the batch sum is per image.
                grads = tape.gradient(picked[j], acts)
                weights = method(acts, grads)
                cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", acts, weights))
                if saliency is not None:  # Guided Grad-CAM: pointwise product at the input's resolution
                    size = tf.shape(images)[1:3]
                    cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0] * saliency[j]
                peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
                maps.append(tf.math.divide_no_nan(cam, peak))
            del tape
            scores = tf.gather(probs, targets, batch_dims=1)
            return tf.stack(maps, axis=1), targets, scores, probs

        h, w = self.classifier.image_size
        fn = tf.function(
            compute,
            input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32), tf.TensorSpec([None, k], tf.int32)],
        )
        self._fns[key] = fn
        return fn

    def _guided_saliency(self, images, targets, k: int) -> list:
        """Per rank, [b, H, W]: the guided-backpropagation gradient of the class logit w.r.t. the pixels,
        its largest magnitude over the colour channels (a pixel matters if any of its channels does)."""
        from cvtool.runtime import tf

        with tf.GradientTape(persistent=k > 1) as tape:
            tape.watch(images)
            logits, _ = self._scores(self.guided_tap(images, training=False)[1])
            picked = [tf.reduce_sum(tf.gather(logits, targets[:, j], batch_dims=1)) for j in range(k)]
        out = [tf.reduce_max(tf.abs(tape.gradient(picked[j], images)), axis=-1) for j in range(k)]
        del tape
        return out

    def compute(self, images: np.ndarray, classes: Sequence[int] | np.ndarray | None = None, top_k: int = 1):
        """Maps for a batch of uint8 RGB images at the model's size, in one forward and K backward passes.

        ``classes`` ([N] class indices, or [N, K]) fixes each image's target
        class; otherwise the K most probable classes of each image are used.
        """
        from cvtool.runtime import tf

        images = tf.convert_to_tensor(np.asarray(images), tf.float32)
        n = int(images.shape[0])
        if classes is None:
            k = min(top_k, self.classifier.num_classes)
            fixed = np.zeros((n, k), np.int32)
        else:
            fixed = np.asarray(classes, np.int32).reshape(n, -1)
            k = fixed.shape[1]
        maps, targets, scores, probs = self._function(k, classes is None)(images, tf.constant(fixed))
        return CamResult(maps.numpy(), targets.numpy(), scores.numpy(), probs.numpy())
