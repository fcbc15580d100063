"""The sample photos that ship with vizkit (sources and licenses: ``vizkit/data/README.md``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: File name → the ImageNet class the photo shows (what a good classifier predicts).
PHOTOS = {"chelsea.jpg": "Egyptian cat", "coffee.jpg": "espresso", "rocket.jpg": "missile"}


def sample_photos() -> list[Path]:
    folder = Path(str(resources.files("vizkit").joinpath("data", "samples")))
    return [folder / name for name in PHOTOS]
