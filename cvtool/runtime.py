"""Importing TensorFlow quietly, once.

TensorFlow's C++ start-up lines (oneDNN, CUDA stubs) are printed before its
logging can be configured, so stderr is pointed at /dev/null while it loads.
Modules that use TensorFlow or Keras import this module first.
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_quietly():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf, keras


try:
    tf, keras = _import_quietly()
except OSError:  # no usable file descriptor 2: import as usual
    import keras
    import tensorflow as tf

tf.get_logger().setLevel("ERROR")
try:
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
except ImportError:  # pragma: no cover - absl ships with TensorFlow
    pass
warnings.filterwarnings("ignore", module=r"keras(\..*)?")
warnings.filterwarnings("ignore", module=r"tensorflow(\..*)?")

__all__ = ["tf", "keras"]


def tensorflow_hub():
    """The tensorflow_hub module, imported after TensorFlow has been imported quietly."""
    import tensorflow_hub as hub

    return hub
