"""Fast feature extraction (Deep Learning with Python, ch. 5): finetune's head phase on cached backbone outputs.

While the backbone is frozen and called in inference mode (pretrained weights),
its output for an image never changes, so there is no need to run it every
epoch: :func:`extract_features` runs the model up to its ``pool`` layer once per
image (train and validation), and :func:`head_model` is a small model over
those feature vectors built from the classifier's own head layers (dropout and
the softmax Dense). The two share their weights, so training the head model
trains the full classifier, which is what the run saves.

Decided by ``FinetuneConfig.cache_features`` through :func:`use_cached_features`:
``auto`` is on when the head phase has no augmentation (random transforms change
the features every epoch) and the weights are pretrained (with ``--weights none``
the backbone's BatchNormalization layers train in the head phase, so its
outputs change). ``on`` in either of those cases is a usage error.

Example::

    if use_cached_features(cfg):
        feats = extract_features(model, decoded.images, batch_size=32)
        head = head_model(model)  # Input(features) -> head_dropout -> predictions
"""

from __future__ import annotations

import numpy as np

from cvtool.errors import UsageError

CACHE_MODES = ("auto", "on", "off")
FEATURE_LAYER = "pool"  # backbone_classifier's global pooling: its output is what the head reads


def use_cached_features(cfg) -> bool:
    """Whether finetune's head phase trains on cached features (``cfg``: a FinetuneConfig).

    Args:
        cfg: the run's config; ``cache_features`` is auto, on or off.

    Raises:
        UsageError: an unknown mode, or ``on`` where features are not fixed (augmentation, ``--weights none``).

    Example: ``use_cached_features(FinetuneConfig(hflip=False))`` is True with the other defaults.
    """
    mode = cfg.cache_features
    if mode not in CACHE_MODES:
        raise UsageError(f"--cache-features must be {', '.join(CACHE_MODES)}; got {mode!r}")
    if mode == "off" or cfg.head_epochs == 0 or cfg.is_hub:
        return False
    why_not = None
    if cfg.augment.enabled:
        on = ", ".join(f"--{k.replace('_', '-')}" for k, v in cfg.augment.to_dict().items() if v)
        why_not = f"the head phase has augmentation ({on}): turn it off (--no-hflip ...) or use --cache-features off"
    elif not cfg.pretrained:
        why_not = "with --weights none the backbone's BatchNormalization trains in the head phase"
    if why_not and mode == "on":
        raise UsageError(f"--cache-features on needs features that never change, but {why_not}")
    return why_not is None


def feature_model(model):
    """``model``'s input -> its ``pool`` layer's output (the frozen backbone's pooled features)."""
    from cvtool.runtime import keras

    return keras.Model(model.inputs, model.get_layer(FEATURE_LAYER).output)


def extract_features(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The pooled backbone features [N, D] float32 of uint8 images [N, H, W, 3], in inference mode.

    Args:
        model: a finetune classifier (``backbone_classifier``: input -> preprocess -> backbone -> pool -> head).
        images: decoded images at the model's size (a memory-mapped cache works too).
        batch_size: images per forward pass.

    Example: ``feats = extract_features(model, tdata.train_set.images)``.
    """
    from cvtool.runtime import tf

    features = feature_model(model)
    forward = tf.function(lambda x: features(x, training=False), reduce_retracing=True)
    dim = int(features.output.shape[-1])
    out = np.empty((len(images), dim), np.float32)
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        out[start : start + len(batch)] = np.asarray(forward(tf.constant(batch)), np.float32)
    return out


def head_model(model):
    """A model over feature vectors made of ``model``'s own head layers (shared weights): trains ``model``'s head.

    Every layer after ``pool`` is reused in order (``head_dropout``, ``predictions``), so
    the head model computes exactly what ``model`` computes after its backbone.
    """
    from cvtool.runtime import keras

    names = [layer.name for layer in model.layers]
    start = names.index(FEATURE_LAYER) + 1
    dim = int(model.get_layer(FEATURE_LAYER).output.shape[-1])
    inputs = keras.Input(shape=(dim,), name="features")
    x = inputs
    for layer in model.layers[start:]:
        x = layer(x)
    return keras.Model(inputs, x, name="cached_features_head")


__all__ = ["CACHE_MODES", "use_cached_features", "extract_features", "head_model", "feature_model"]
