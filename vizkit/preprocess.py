"""Pixel preprocessing: from 0-255 RGB (or gray) pixels to what the model was trained on.

Every mode is plain arithmetic, so it works on NumPy arrays and on TensorFlow tensors
alike; the filters technique differentiates through it to optimize in pixel space.
The three ImageNet modes are those of ``keras.applications.imagenet_utils``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vizkit.importing import import_object

Preprocess = Callable[[object], object]

_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype="float32")
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype="float32")
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype="float32")


def caffe(x):
    """RGB→BGR, minus the ImageNet mean per channel, no scaling (VGG16, ResNet50)."""
    return x[..., ::-1] - _CAFFE_MEAN_BGR


def tf(x):
    """Scaled to [-1, 1] (MobileNet, Inception, Xception)."""
    return x / 127.5 - 1.0


def torch(x):
    """Scaled to [0, 1], then standardized with the ImageNet mean and std (DenseNet)."""
    return (x / 255.0 - _TORCH_MEAN) / _TORCH_STD


def unit(x):
    """Scaled to [0, 1], as ``ImageDataGenerator(rescale=1/255)`` trained models expect."""
    return x / 255.0


def none(x):
    """Raw 0-255 pixels, for models that preprocess inside (EfficientNet, ConvNeXt)."""
    return x


MODES: dict[str, Preprocess] = {
    "caffe": caffe,
    "tf": tf,
    "torch": torch,
    "unit": unit,
    "none": none,
}


def resolve(spec: str) -> Preprocess:
    """A mode name or ``package.module:function``."""
    if spec in MODES:
        return MODES[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown preprocessing {spec!r}: use one of {', '.join(MODES)} "
            "or package.module:function"
        )
    return import_object(spec, "preprocessing")
