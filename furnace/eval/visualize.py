"""Colour maps and composite images for ``eval.py -s`` (REFERENCE 5.7, QUIRK 33 fixed).

A composite is, left to right with 15-px black bars between: the input image, the prediction,
the ground truth (both in the true class colours; pixels whose ground truth is 255 are white),
and, when available, the variance map of the evaluated branch (JET colour map, blue = low)
and the error map (wrong pixels white, correct black, ignored grey), so the two can be
compared side by side.
Every dataset gets the same layout and the palette is not shifted or R/B-swapped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
import torch

IGNORE_COLOR = (255, 255, 255)
ERROR_COLORS = {"correct": (0, 0, 0), "wrong": (255, 255, 255), "ignored": (128, 128, 128)}
BAR_WIDTH = 15

ArrayLike = Union[np.ndarray, torch.Tensor]


def get_palette(dataset: str, num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3] RGB class colours (Cityscapes or the PASCAL colormap)."""
    try:
        from furnace.data import default_palette
    except ImportError:
        from furnace.data.palettes import default_palette
    return np.asarray(default_palette(dataset, num_classes), dtype=np.uint8)


def get_class_names(dataset: str, num_classes: int, class_names=None) -> list:
    """Class names for the result table (config names, the dataset's, or ``class_<i>``)."""
    try:
        from furnace.data import default_class_names
    except ImportError:
        from furnace.data.palettes import default_class_names
    return list(default_class_names(dataset, num_classes, class_names))


def _numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def colorize(label: ArrayLike, palette: np.ndarray,
             ignore: Optional[ArrayLike] = None) -> np.ndarray:
    """Paint a class map [H, W] with ``palette`` [C, 3]; returns uint8 RGB [H, W, 3].

    Value 255 is painted white, other values outside [0, C) black. ``ignore`` (bool [H, W]),
    when given, also paints those pixels white (used for predictions where the GT is 255).
    """
    label = _numpy(label).astype(np.int64)
    palette = np.asarray(palette, dtype=np.uint8)
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    white = label == 255
    if ignore is not None:
        white = white | _numpy(ignore).astype(bool)
    out[white] = IGNORE_COLOR
    return out


def variance_to_color(var: ArrayLike) -> np.ndarray:
    """Colour map of a variance map [H, W]: min-max normalised, JET; uint8 RGB [H, W, 3]."""
    v = _numpy(var).astype(np.float64)
    finite = np.isfinite(v)
    lo, hi = (v[finite].min(), v[finite].max()) if finite.any() else (0.0, 0.0)
    scaled = np.zeros_like(v) if hi <= lo else (np.where(finite, v, lo) - lo) / (hi - lo)
    gray = np.round(scaled * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(gray, cv2.COLORMAP_JET)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def error_to_color(pred: ArrayLike, label: ArrayLike, num_classes: int) -> np.ndarray:
    """Error map uint8 RGB [H, W, 3] of pred vs label ([H, W] each): wrong pixels white,
    correct black, pixels with a label outside [0, num_classes) (255) grey."""
    pred, label = _numpy(pred).astype(np.int64), _numpy(label).astype(np.int64)
    out = np.empty(label.shape + (3,), dtype=np.uint8)
    valid = (label >= 0) & (label < num_classes)
    out[:] = ERROR_COLORS["ignored"]
    out[valid & (pred == label)] = ERROR_COLORS["correct"]
    out[valid & (pred != label)] = ERROR_COLORS["wrong"]
    return out


def make_composite(image: np.ndarray, pred: ArrayLike, label: Optional[ArrayLike],
                   palette: np.ndarray, var: Optional[ArrayLike] = None,
                   bar: int = BAR_WIDTH, errors: bool = False) -> np.ndarray:
    """Side-by-side uint8 RGB [H, W_total, 3]: image | prediction | ground truth | variance
    | errors.

    image: uint8 RGB [H, W, 3]; pred: [H, W] class ids; label: [H, W] (255 = ignore) or None
    (no GT panel); var: float [H, W] or None (no variance panel); errors: add the error map
    (:func:`error_to_color`, needs ``label``). Panels are separated by ``bar``-pixel black
    columns.
    """
    h, w = image.shape[:2]
    label_np = _numpy(label) if label is not None else None
    ignore = (label_np == 255) if label_np is not None else None
    panels = [np.asarray(image, dtype=np.uint8), colorize(pred, palette, ignore)]
    if label_np is not None:
        panels.append(colorize(label_np, palette))
    if var is not None:
        panels.append(variance_to_color(var))
    if errors and label_np is not None:
        panels.append(error_to_color(pred, label_np, len(palette)))
    for p in panels:
        if p.shape[:2] != (h, w):
            raise ValueError(f"composite panels differ in size: {p.shape[:2]} vs {(h, w)}")
    sep = np.zeros((h, bar, 3), dtype=np.uint8)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(sep)
        parts.append(p)
    return np.concatenate(parts, axis=1)


def save_rgb(path: Union[str, os.PathLike], rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG (cv2 expects BGR, so channels are reversed here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1])):
        raise OSError(f"cannot write image {path}")
    return path


def safe_name(fn: str) -> str:
    """A file name for sample ``fn`` (path separators replaced), with .png."""
    name = str(fn).replace("/", "_").replace("\\", "_").strip() or "image"
    return name if name.endswith(".png") else name + ".png"
