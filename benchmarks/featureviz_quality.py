"""Feature visualization on EfficientNet-Lite0: is it the class, and is it smooth?

Run by hand:  python benchmarks/featureviz_quality.py [--classes 1,130,207,948,417] [--save DIR]

1. Class images (``filters.objective=class``, fourier, 256 Adam steps by default): the model's
   probability of each class for its own image, and after random 80% crops (4 per image,
   seeded, resized back to 224 px): the worst of them. Made with the standard transforms
   and without them.
2. Filter patterns of one layer, pixel (the chapter) vs fourier on the same filters and
   seed: the share of the power spectrum above half the Nyquist frequency
   (``vizkit.featureviz.high_frequency_share``) and the mean activation reached.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import keras
import numpy as np
from PIL import Image

from vizkit import ModelGraph, featureviz, kit
from vizkit.labels import imagenet_labels
from vizkit.plugins.efficientnet_lite import model as lite
from vizkit.plugins.filters import class_patterns, filter_patterns


def preprocess(x):
    return x / 127.5 - 1  # the model's "tf" preprocessing


def random_crops(pixels: np.ndarray, crops: int, share: float, seed: int) -> np.ndarray:
    """``crops`` random square crops of ``share`` of the side per image, resized back."""
    rng = np.random.default_rng(seed)
    size = pixels.shape[1]
    side = int(size * share)
    out = []
    for image in pixels:
        for y, x in rng.integers(0, size - side, (crops, 2)):
            out.append(cv2.resize(image[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_LINEAR))
    return np.stack(out)


def classes_check(model, classes: list[int], steps: int, save: Path | None) -> None:
    labels = imagenet_labels()
    print(f"class images, fourier, {steps or 'default'} Adam steps; p(class) on the image / worst of 4 random 80% crops")
    for transforms in ("standard", "none"):
        began = time.perf_counter()
        _, pixels = class_patterns(model, classes, steps=steps, preprocess=preprocess, transforms=transforms)
        whole = keras.ops.convert_to_numpy(model(preprocess(pixels)))[np.arange(len(classes)), classes]
        cropped = keras.ops.convert_to_numpy(model(preprocess(random_crops(pixels, 4, 0.8, seed=0))))
        worst = cropped[np.arange(len(cropped)), np.repeat(classes, 4)].reshape(len(classes), 4).min(1)
        elapsed = time.perf_counter() - began
        print(f"  transforms={transforms} ({elapsed:.0f} s)")
        for c, p, q in zip(classes, whole, worst):
            print(f"    {kit.describe_class(c, labels):28s} {p:.3f} / {q:.3f}")
        if save:
            grid = kit.tile_with_labels(np.clip(pixels, 0, 255).astype("uint8"), [labels[c] for c in classes], per_row=5)
            Image.fromarray(grid).save(save / f"classes-{transforms}.png")


def smoothness_check(model, layer: str, count: int, size: int, save: Path | None) -> None:
    probe = ModelGraph.of(model).free_size().probe([layer])  # the layer at any size
    print(f"filter patterns of {layer}, filters 0-{count - 1}, {size} px, seed 0")
    for param in ("pixel", "fourier"):
        began = time.perf_counter()
        pictures, pixels = filter_patterns(model, layer, filters=count, size=size, param=param, preprocess=preprocess)
        activation = keras.ops.convert_to_numpy(probe(preprocess(pixels))).mean((1, 2))[np.arange(count), np.arange(count)]
        share = featureviz.high_frequency_share(pixels)
        print(f"  {param:8s} high-frequency share {share.mean():.3f} (min {share.min():.3f}, max {share.max():.3f}), "
              f"mean activation {activation.mean():.3f}  ({time.perf_counter() - began:.0f} s)")
        if save:
            Image.fromarray(kit.tile_with_labels(pictures, [str(i) for i in range(count)], per_row=4)).save(save / f"{layer}-{param}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="1,130,207,948,417", help="ImageNet class indices")
    parser.add_argument("--steps", type=int, help="Adam steps of the class images (default: the technique's, 256)")
    parser.add_argument("--layer", default="block5_project_conv")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--save", type=Path, help="a folder for the pictures")
    args = parser.parse_args()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    model = lite.cached_model()
    classes_check(model, [int(c) for c in args.classes.split(",")], args.steps, args.save)
    smoothness_check(model, args.layer, args.count, args.size, args.save)


if __name__ == "__main__":
    main()
