"""Importing TensorFlow quietly, once, when a model is about to load (never at start-up)."""

from __future__ import annotations

import os


def start_tensorflow() -> None:
    """Import TensorFlow and find its devices with stderr muted.

    Its C++ start-up lines (oneDNN, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL and would
    bury vizkit's own messages; Python errors still propagate as exceptions.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
        tf.get_logger().setLevel("ERROR")  # e.g. retracing notes: one graph per layer is by design
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
