"""Importing TensorFlow quietly, once, when a model is about to load (never at start-up)."""

from __future__ import annotations

import os


#: TensorFlow 2.21's Linux wheels leave oneDNN's CPU kernels off unless asked. On a 2-core
#: AVX2 CPU they run VGG16's convolutions forward and backward at 97-102% of the measured
#: float32 matmul peak against 64-69% without (benchmarks/README.md, filter patterns);
#: reproducible runs stay byte-identical. TF_ENABLE_ONEDNN_OPTS=0 turns them off.
ONEDNN = "TF_ENABLE_ONEDNN_OPTS"


def start_tensorflow() -> None:
    """Import TensorFlow and find its devices with stderr muted.

    Its C++ start-up lines (oneDNN, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL and would
    bury vizkit's own messages; Python errors still propagate as exceptions.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault(ONEDNN, "1")
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
