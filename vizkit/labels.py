"""Class names: the ImageNet list that ships with vizkit, and user label files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

IMAGENET_CLASSES = 1000


class LabelsError(ValueError):
    """A labels file that cannot be read as class names."""


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (source: ``vizkit/data/README.md``)."""
    text = resources.files("vizkit").joinpath("data", "imagenet_classes.txt").read_text(encoding="utf-8")
    labels = text.splitlines()
    if len(labels) != IMAGENET_CLASSES:
        raise ValueError(f"vizkit/data/imagenet_classes.txt has {len(labels)} lines, not {IMAGENET_CLASSES}")
    return labels


def read_labels(path: Path) -> list[str]:
    """Class names from a JSON list, or from a text file with one name per line."""
    try:
        text = path.read_text(encoding="utf-8")
        labels = json.loads(text) if path.suffix.lower() == ".json" else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabelsError(f"--labels {path}: cannot read it ({error})") from None
    if labels is None:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(labels, list):
        raise LabelsError(f"--labels {path}: expected a JSON list of class names")
    return [str(label) for label in labels]
