"""Array-to-picture helpers shared by the techniques: the chapter's display formulas."""

from __future__ import annotations

import cv2
import numpy as np


def standardize_channel(channel: np.ndarray) -> np.ndarray:
    """One feature map as uint8, as the chapter shows it: (x - mean) / std × 64 + 128, clipped.

    A constant map (std = 0) comes out flat gray instead of NaN.
    """
    x = channel.astype("float64") - channel.mean()
    std = x.std()
    if std > 0:
        x /= std
    return np.clip(x * 64 + 128, 0, 255).astype("uint8")


def deprocess_pattern(x: np.ndarray) -> np.ndarray:
    """The chapter's deprocess of a filter pattern: center, std → 0.1, +0.5, clip, ×255."""
    x = x.astype("float64") - x.mean()
    x /= x.std() + 1e-5
    x = np.clip(x * 0.1 + 0.5, 0, 1)
    return np.clip(x * 255, 0, 255).astype("uint8")


def tile(pictures: np.ndarray, per_row: int, margin: int = 0, fill: int = 0) -> np.ndarray:
    """Lay N same-sized pictures (N×H×W or N×H×W×C) out in rows of ``per_row``."""
    count, height, width = pictures.shape[:3]
    per_row = max(1, min(per_row, count))
    rows = -(-count // per_row)
    grid_shape = (
        rows * height + (rows - 1) * margin,
        per_row * width + (per_row - 1) * margin,
    ) + pictures.shape[3:]
    grid = np.full(grid_shape, fill, dtype=pictures.dtype)
    for i, picture in enumerate(pictures):
        top = (i // per_row) * (height + margin)
        left = (i % per_row) * (width + margin)
        grid[top : top + height, left : left + width] = picture
    return grid


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    """The chapter's overlay: heatmap resized to the image, JET-colored, ×alpha + image."""
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    height, width = rgb.shape[:2]
    resized = cv2.resize(heatmap.astype("float32"), (width, height))
    colored = cv2.applyColorMap(np.uint8(255 * np.clip(resized, 0, 1)), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    return np.clip(colored * alpha + rgb, 0, 255).astype("uint8")
