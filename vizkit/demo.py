"""A demo that needs no download: a small convnet trained in seconds on drawn shapes.

It stands in until a real pretrained ImageNet model ships with vizkit; the shapes make
it easy to check the pictures: Grad-CAM should sit on the shape, filters show edges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

LABELS = ["circle", "square", "triangle"]
SIZE = 64


def draw_shape(kind: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One size×size RGB image: a filled shape of class ``kind`` on a noisy background."""
    image = rng.integers(0, 90, (size, size, 3)).astype("uint8")
    color = tuple(int(c) for c in rng.integers(140, 256, 3))
    radius = int(rng.integers(size // 8, size // 4))
    cx, cy = (int(v) for v in rng.integers(radius + 2, size - radius - 2, 2))
    if kind == 0:
        cv2.circle(image, (cx, cy), radius, color, -1)
    elif kind == 1:
        cv2.rectangle(image, (cx - radius, cy - radius), (cx + radius, cy + radius), color, -1)
    else:
        points = np.array([[cx, cy - radius], [cx - radius, cy + radius], [cx + radius, cy + radius]])
        cv2.fillPoly(image, [points.astype("int32")], color)
    return image


def shapes_model(samples: int = 1200, epochs: int = 4):
    """The demo classifier, trained with fixed seeds (a few seconds on a CPU)."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(samples) % len(LABELS)
    images = np.stack([draw_shape(int(k), rng) for k in labels]).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Rescaling(1 / 255.0, name="rescale"),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same", name="block1_conv1"),
            keras.layers.MaxPooling2D(name="block1_pool"),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="block2_conv1"),
            keras.layers.MaxPooling2D(name="block2_pool"),
            keras.layers.Conv2D(64, 3, activation="relu", padding="same", name="block3_conv1"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dense(len(LABELS), activation="softmax", name="predictions"),
        ],
        name="vizkit_shapes_demo",
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=epochs, batch_size=32, shuffle=False, verbose=0)
    return model


def write_samples(folder: Path) -> list[Path]:
    """One unseen image per class (other seed than training), as PNG files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    paths = []
    for kind, name in enumerate(LABELS):
        path = folder / f"{name}.png"
        Image.fromarray(draw_shape(kind, rng)).save(path)
        paths.append(path)
    return paths


def run_demo(outdir: Path | None = None, progress: Callable[[str], None] = lambda message: None):
    """Train the demo model, draw sample images and write a report with every technique."""
    from vizkit.runner import RunOptions, default_outdir, run

    outdir = outdir or default_outdir("demo")
    inputs = outdir / "demo-inputs"
    images = write_samples(inputs)
    labels = inputs / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    progress("training the demo model on drawn shapes")
    options = RunOptions(labels=labels, settings={"filters": {"size": str(SIZE)}})
    return run("vizkit.demo:shapes_model", images, options, outdir, progress=progress)
