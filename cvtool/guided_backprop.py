"""Guided backpropagation (Springenberg et al.), for Guided Grad-CAM (Selvaraju et al.).

Backpropagation through a ReLU passes the gradient where the ReLU's input was
positive; the "deconvnet" rule passes it where the gradient is positive; guided
backpropagation passes it only where both are (``dy * [x > 0] * [dy > 0]``), so
what reaches the image is the evidence for the class, without the negative
gradients that make plain saliency maps noisy.

Keras 3 has no gradient override registry, so :func:`guided_clone` copies the
model (nested models included: a finetune backbone) with every ReLU replaced by
:func:`guided_relu`, a ``tf.custom_gradient`` ReLU with the guided rule, and the
model's weights. Its forward pass is the model's. ReLUs are ``Activation("relu")``
layers, layers with ``activation="relu"`` (Conv2D, Dense...) and ``ReLU`` layers
(``max_value`` included: MobileNetV2's ReLU6, whose gradient is also gated at the
cap); other activations (swish in EfficientNet) keep their plain gradients.

Example::

    guided = guided_clone(model)
    with tf.GradientTape() as tape:
        tape.watch(images)
        score = guided(images)[:, class_index]
    saliency = tape.gradient(score, images)
"""

from __future__ import annotations

import functools


def guided_relu(x, max_value: float | None = None):
    """ReLU (or ReLU capped at ``max_value``) whose gradient is ``dy * [0 < x (< max_value)] * [dy > 0]``."""
    from cvtool.runtime import tf

    @tf.custom_gradient
    def relu(x):
        y = (
            tf.nn.relu(x)
            if max_value is None
            else tf.clip_by_value(x, tf.cast(0, x.dtype), tf.cast(max_value, x.dtype))
        )

        def grad(dy):
            gate = x > 0 if max_value is None else tf.logical_and(x > 0, x < max_value)
            return dy * tf.cast(gate, dy.dtype) * tf.cast(dy > 0, dy.dtype)

        return y, grad

    return relu(x)


def _guided_layer(layer):
    """A copy of ``layer`` (not yet built) with its ReLU made guided; other layers copied as they are."""
    from cvtool.runtime import keras

    config = layer.get_config()
    if isinstance(layer, keras.layers.ReLU) and not config.get("negative_slope") and not config.get("threshold"):
        guided = functools.partial(guided_relu, max_value=config.get("max_value"))
        return keras.layers.Activation(guided, name=layer.name, dtype=layer.dtype_policy)
    if config.get("activation") == "relu":
        config["activation"] = guided_relu
    return layer.__class__.from_config(config)


def guided_clone(model):
    """``model`` with guided-backpropagation ReLUs, same weights, same outputs (see the module's docstring).

    Args:
        model: a Keras functional or Sequential model (nested models are cloned too).

    Example: ``guided_clone(load_classifier("runs/a").model)``.
    """
    import cvtool.layers  # noqa: F401 - cvtool's layers must be registered for from_config
    from cvtool.runtime import keras

    clone = keras.models.clone_model(model, clone_function=_guided_layer, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


__all__ = ["guided_relu", "guided_clone"]
