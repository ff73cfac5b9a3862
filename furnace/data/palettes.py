"""Class names and colour palettes of the supported datasets (REFERENCE 4.6).

Palettes are uint8 numpy arrays of shape [N, 3] in RGB order; row c is the colour of class c.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

CITYSCAPES_CLASSES: List[str] = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
]

CITYSCAPES_PALETTE: np.ndarray = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)

VOC_CLASSES: List[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tv/monitor",
]


def voc_palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC bit-interleaved colormap.

    Args:
        n: number of colours (classes), >= 0.
    Returns:
        uint8 array [n, 3], RGB. Class c takes bit k of c (k = 0, 3, 6, ... for R; 1, 4, ...
        for G; 2, 5, ... for B) and places it at bit 7 - k//3 of the channel.
    """
    if n < 0:
        raise ValueError(f"voc_palette: n must be >= 0, got {n}")
    pal = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        r = g = b = 0
        cid = c
        shift = 7
        while cid:
            r |= (cid & 1) << shift
            g |= ((cid >> 1) & 1) << shift
            b |= ((cid >> 2) & 1) << shift
            cid >>= 3
            shift -= 1
        pal[c] = (r, g, b)
    return pal


VOC_PALETTE: np.ndarray = voc_palette(21)


def default_class_names(dataset: str, num_classes: int,
                        class_names: Optional[Sequence[str]] = None) -> List[str]:
    """Class names for `dataset` ('voc' | 'city' | other), length `num_classes`.

    Explicit `class_names` win (their length must equal num_classes). The standard lists are
    used when the class count matches; otherwise generic names 'class_<i>' are returned.
    """
    if class_names is not None:
        names = list(class_names)
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} entries but num_classes={num_classes}; "
                             "make them agree (or set class_names=None for the defaults)")
        return names
    if dataset == "city" and num_classes == len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES)
    if dataset == "voc" and num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


def default_palette(dataset: str, num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3] RGB palette: Cityscapes colours for 'city' with 19 classes,
    otherwise the PASCAL bit-interleaved colormap (which also serves the demo data)."""
    if dataset == "city" and num_classes == len(CITYSCAPES_CLASSES):
        return CITYSCAPES_PALETTE.copy()
    return voc_palette(num_classes)
