"""Peak memory of a run against the number of images: is it flat?

Run by hand:  python benchmarks/bench_memory.py [--counts 100,2000] [--technique gradcam]
                  [--model efficientnet-lite0|tiny|SPEC] [--metrics faithfulness] [-- more run args]

Writes N images made from the three sample photos (seeded random square crops of 60-100%
of the short side, half of them flipped, resized to 256 px) into a temporary folder, then
runs ``vizkit run efficientnet-lite0 FOLDER -t TECHNIQUE --no-metrics`` on them in a fresh
process per count and prints its peak resident memory (the child's ``ru_maxrss``), the
wall time, and images per second. Issue 11's target: peak RSS at the largest count within
10% of the smallest's, and under 2 GB. ``--model tiny`` runs a small CNN at 32 px instead
(fast: thousands of images in a minute, to see what each image's records cost), and
``--metrics`` measures the explanations with those metrics instead of none.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vizkit.samples import sample_photos


def write_images(folder: Path, count: int, seed: int = 0, side: int = 256) -> None:
    """``count`` JPEGs made from the sample photos: crops, flips, resized to ``side``."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(path).convert("RGB") for path in sample_photos()]
    for index in range(count):
        photo = photos[index % len(photos)]
        short = min(photo.size)
        crop = int(short * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, photo.width - crop + 1), rng.integers(0, photo.height - crop + 1)
        image = photo.crop((x, y, x + crop, y + crop)).resize((side, side), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(folder / f"img{index:05d}.jpg", quality=90)


def tiny_model(path: Path) -> str:
    """A small CNN classifier (32 px, 10 classes, random weights) saved at ``path``."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x)).save(path)
    return str(path)


def measure(folder: Path, outdir: Path, technique: str, extra: list[str], model: str = "efficientnet-lite0",
            metrics: str | None = None) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one ``vizkit run`` in a fresh process."""
    measured = [arg for name in metrics.split(",") for arg in ("-m", name)] if metrics else ["--no-metrics"]
    command = [sys.executable, "-m", "vizkit", "run", model, str(folder), "-t", technique,
               *measured, "-q", "-o", str(outdir), *extra]
    began = time.perf_counter()
    # each count in its own child: ru_maxrss of RUSAGE_CHILDREN is the largest child so far
    runner = [sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *command]
    done = subprocess.run(runner, check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100,2000")
    parser.add_argument("--technique", default="gradcam")
    parser.add_argument("--model", default="efficientnet-lite0", help="a model spec, or tiny: a small CNN at 32 px")
    parser.add_argument("--metrics", help="metrics to run (comma-separated); default: none")
    parser.add_argument("extra", nargs="*", help="more arguments for vizkit run (after --)")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="vizkit-bench-memory-") as tmp:
        results = []
        for count in counts:
            folder = Path(tmp) / f"images-{count}"
            folder.mkdir()
            write_images(folder, count)
            model = tiny_model(Path(tmp) / "tiny.keras") if args.model == "tiny" else args.model
            rss, wall = measure(folder, Path(tmp) / f"report-{count}", args.technique, args.extra, model, args.metrics)
            results.append((count, rss, wall))
            size = sum(f.stat().st_size for f in (Path(tmp) / f"report-{count}").rglob("*") if f.is_file())
            print(f"{count:6d} images: peak RSS {rss:7.0f} MiB, {wall:6.1f} s wall, "
                  f"{count / wall:5.1f} images/s (start-up included), report {size / 2**20:.1f} MiB", flush=True)
    (small, small_rss, _), (large, large_rss, _) = results[0], results[-1]
    print(f"peak RSS at {large} vs {small} images: {large_rss / small_rss:.2f}× (target ≤ 1.10, and < 2048 MiB)")
    print(f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
