"""Keras layers that cvtool builds into saved models.

They are registered serializable classes (not Lambda layers), so models that
contain them load with ``safe_mode=True``. Keras finds them once this module
has been imported (``import cvtool`` alone does not import it)::

    import keras
    import cvtool.layers  # registers cvtool>Preprocess

    model = keras.models.load_model("runs/clothes/model.keras")

A model that must load with nothing of cvtool at all is exported instead
(``cvtool export RUN --format saved_model|tflite|onnx``).
"""

from __future__ import annotations

from cvtool.runtime import keras

ops = keras.ops

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

PREPROCESS_MODES = ("none", "rescale", "tf", "caffe", "torch")


@keras.saving.register_keras_serializable(package="cvtool")
class Preprocess(keras.layers.Layer):
    """Turn RGB pixels in [0, 255] into what a network expects.

    Modes follow ``keras.applications``' ``preprocess_input``:
    ``rescale`` [0, 1]; ``tf`` [-1, 1]; ``caffe`` BGR minus the ImageNet mean;
    ``torch`` [0, 1] standardised by the ImageNet mean and std; ``none`` passes
    pixels through (EfficientNet, ConvNeXt and MobileNetV3 normalise inside).
    """

    def __init__(self, mode: str = "rescale", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "rescale":
            return x / 255.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
