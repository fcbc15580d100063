"""Filter patterns: one compiled batched ascent vs the chapter's one filter at a time.

Run by hand:  python benchmarks/bench_filters.py [--model vgg16] [--count 16] [--steps 10]
Prints both times and their ratio (one run, same machine: compare the ratio, not the seconds).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from vizkit.models import load_model
from vizkit.plugins.filters import filter_patterns, initial_inputs


def one_at_a_time(model, layer, start, steps, step):
    """The chapter's loop: a sub-model to the layer, one filter per tape, eager."""
    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    for index, x in enumerate(start):
        x = tf.constant(x[None])
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_mean(sub(x)[..., index])
            grads = tape.gradient(loss, x)
            x = x + step * grads / (tf.sqrt(tf.reduce_mean(tf.square(grads))) + 1e-5)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--layer", default="block3_conv1")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    model = load_model(args.model, weights="none").model
    start = initial_inputs(args.count, args.size, 3, seed=0)

    began = time.perf_counter()
    filter_patterns(model, args.layer, filters=args.count, size=args.size, steps=args.steps, start=start)
    batched = time.perf_counter() - began

    began = time.perf_counter()
    one_at_a_time(model, args.layer, start, args.steps, 1.0)
    single = time.perf_counter() - began

    print(f"{args.model} {args.layer}, {args.count} filters × {args.steps} steps at {args.size}px")
    print(f"batched (vizkit): {batched:.1f} s   one at a time (chapter): {single:.1f} s   ratio {single / batched:.2f}×")


if __name__ == "__main__":
    main()
