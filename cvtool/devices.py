"""Where training runs: distribution strategy, mixed precision, determinism.

One GPU or none: the default strategy. Several GPUs on this host:
``MirroredStrategy``. ``TF_CONFIG`` set (a multi-host job):
``MultiWorkerMirroredStrategy``. Mixed precision (``mixed_float16``) is used
on GPUs that run it fast (compute capability 7.0 or higher) when ``auto``.
"""

from __future__ import annotations

import os

import cvtool.runtime  # noqa: F401 - quiet TensorFlow import
from cvtool.errors import UsageError

MIXED_PRECISION_MODES = ("auto", "on", "off")


def distribution_strategy():
    """The tf.distribute strategy for this process (see the module docstring)."""
    from cvtool.runtime import tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def strategy_name(strategy) -> str:
    """How the run is spread over devices, for the log line ("one device", "MirroredStrategy on 2 replicas")."""
    name = type(strategy).__name__
    if name.startswith("_Default") or strategy.num_replicas_in_sync == 1 and "Mirrored" not in name:
        return "one device"
    return f"{name} on {strategy.num_replicas_in_sync} replicas"


def gpu_supports_mixed_precision() -> bool:
    from cvtool.runtime import tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return False
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if not capability or tuple(capability) < (7, 0):
            return False
    return True


def use_mixed_precision(mode: str) -> bool:
    if mode not in MIXED_PRECISION_MODES:
        raise UsageError(f"--mixed-precision must be auto, on or off, got {mode!r}")
    if mode == "auto":
        return gpu_supports_mixed_precision()
    return mode == "on"


def set_precision(mixed: bool) -> str:
    """Set Keras' global dtype policy; returns the previous policy name (to restore it afterwards)."""
    from cvtool.runtime import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    return previous


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TensorFlow ops deterministic."""
    from cvtool.runtime import keras, tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
