"""Class names: the ImageNet list that ships with vizkit, and user label files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from vizkit.safe_read import MIB, describe_os_error, display_path, read_regular

IMAGENET_CLASSES = 1000
#: Largest labels file read: 21k ImageNet names fit in under 1 MiB.
MAX_LABELS_BYTES = 4 * MIB


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
    """Class names from a JSON list, or from a text file with one name per line.

    Only a regular file of at most ``MAX_LABELS_BYTES`` is read (a FIFO would block,
    ``/dev/zero`` never ends); every failure is a LabelsError naming the file.
    """
    try:
        text = read_regular(path, MAX_LABELS_BYTES).decode("utf-8")
        labels = json.loads(text) if path.suffix.lower() == ".json" else None
    except OSError as error:
        raise LabelsError(f"--labels {display_path(path)}: cannot read it: {describe_os_error(error)}") from None
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested too deep
        raise LabelsError(f"--labels {display_path(path)}: cannot read it ({_short(error)})") from None
    if labels is None:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(labels, list):
        raise LabelsError(f"--labels {display_path(path)}: expected a JSON list of class names")
    return [str(label) for label in labels]


def _short(error: Exception) -> str:
    """An error's message, bounded: a decode error can quote much of the file."""
    text = str(error) if not isinstance(error, RecursionError) else "nested too deeply"
    return text if len(text) <= 200 else text[:200] + "…"


def class_index(value: str | int, labels: list[str] | None, classes: int) -> int:
    """A class given as an index or as one of ``labels``; ValueError names what is accepted."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
    elif labels and text in labels:
        index = labels.index(text)
    else:
        raise ValueError(f"class {value!r} is neither a class index nor one of the model's labels")
    if not 0 <= index < classes:
        raise ValueError(f"class {index} is outside 0-{classes - 1}")
    return index


def describe_class(index: int, labels: list[str] | None) -> str:
    """``285 Egyptian cat`` where the label is known, else ``285``."""
    return f"{index} {labels[index]}" if labels and 0 <= index < len(labels) else str(index)


def describe_predictions(predictions: list[dict]) -> str:
    """``285 Egyptian cat: 0.813; 282 tiger cat: 0.076`` from ``{index, label, score}`` dicts."""
    return "; ".join(f"{describe_class(p['index'], None)}{' ' + p['label'] if p['label'] else ''}: {p['score']:.3f}" for p in predictions)
