"""Image-level class labels (spec methods/LPL.md 6.3): which classes an image contains.

From a mask, the reference's rule: copy the full label map (before any augmentation or crop),
set 255 to 0, and mark every value that occurs. Background (0) is therefore marked for every
image that has a 0 or a 255 pixel, i.e. essentially every VOC image (object borders are 255).

From a list file, one image per line::

    # comment
    2007_000032 0 1 15
    2007_000039 0 20

the id, then its class indices, separated by whitespace; ``#`` starts a comment, blank lines
are skipped. The config key ``image_labels`` chooses between the two (``"masks"`` or a list
path, see :func:`image_labels_source`).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from .datasets import DataError, read_text_lines, resolve_source
from .transforms import IGNORE_INDEX

#: the ``image_labels`` value that derives the labels from the label PNGs
FROM_MASKS = "masks"


def image_level_label(mask: np.ndarray, num_classes: int, where: str = "") -> np.ndarray:
    """The image-level label y of one full label map (rule of spec 6.3).

    Args:
        mask: uint8 (or integer) [H, W] class indices, 255 = ignore.
        num_classes: C.
        where: the label file (named in the error).
    Returns:
        float32 [C]: y_c = 1 for every class c that occurs once 255 is read as 0, else 0.
    Raises DataError for a value that is neither < num_classes nor 255.
    """
    values = np.unique(np.asarray(mask))
    bad = values[((values >= num_classes) & (values != IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        src = f"label {where}" if where else "a label map"
        raise DataError(f"{src} has values {bad[:10].tolist()} outside [0, {num_classes}) "
                        f"and 255; check num_classes={num_classes} and that the PNG stores "
                        f"class indices (255 = ignore)")
    y = np.zeros(int(num_classes), dtype=np.float32)
    # 255 -> 0: ignore pixels (object borders) count as background, as in the reference
    present = np.where(values == IGNORE_INDEX, 0, values).astype(np.int64)
    y[present] = 1.0
    return y


def classes_line(name: str, y: np.ndarray) -> str:
    """One list-file line ``<id> <c1> <c2> ...`` for the label vector y (float [C])."""
    return " ".join([name] + [str(int(c)) for c in np.flatnonzero(np.asarray(y) > 0)])


def read_image_label_list(path: str, num_classes: int) -> Dict[str, np.ndarray]:
    """Read an image-label list file: {id: float32 [C] label vector}.

    A line is ``<id> <c1> <c2> ...`` (class indices, whitespace-separated, at least one);
    ``#`` comments and blank lines are skipped. A malformed line (no class, a class that is not
    an integer), a class outside [0, num_classes) and a repeated id raise DataError naming
    ``path:line``.
    """
    raw = read_text_lines(path, "image-label list", "config key image_labels: give 'masks' or "
                          "a list path, relative to dataset_path or absolute")
    out: Dict[str, np.ndarray] = {}
    first: Dict[str, int] = {}
    for ln, line in enumerate(raw, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{ln}"
        parts = text.split()
        name, classes = parts[0], parts[1:]
        if not classes:
            raise DataError(f"{where}: {text!r} names no class; a line is '<id> <c1> <c2> ...' "
                            f"with at least one class index (background is 0)")
        y = np.zeros(int(num_classes), dtype=np.float32)
        for tok in classes:
            try:
                c = int(tok)
            except ValueError:
                raise DataError(f"{where}: class {tok!r} is not an integer; a line is "
                                f"'<id> <c1> <c2> ...' with class indices") from None
            if not 0 <= c < num_classes:
                raise DataError(f"{where}: class {c} of {name!r} is outside [0, {num_classes}); "
                                f"check num_classes={num_classes} or fix the line")
            y[c] = 1.0
        if name in out:
            raise DataError(f"{where}: id {name!r} is listed again (first at line "
                            f"{first[name]}); remove the repeated line")
        out[name] = y
        first[name] = ln
    return out


def image_labels_source(C, root: str) -> Optional[str]:
    """The image-label list path the config key ``image_labels`` names (relative paths are
    taken relative to ``root``, the dataset folder), or None for ``"masks"``."""
    value = C.get("image_labels", FROM_MASKS) if hasattr(C, "get") else \
        getattr(C, "image_labels", FROM_MASKS)
    if value is None or str(value) == FROM_MASKS:
        return None
    return resolve_source(root, str(value), "image_labels")


def check_listed(labels: Dict[str, np.ndarray], names: Iterable[Tuple[str, str]],
                 list_path: str) -> None:
    """DataError naming the image-label list and the id when an id has no line in ``labels``.

    names: (id, where) pairs, ``where`` the data list's ``file:line`` of the id."""
    for name, where in names:
        if name not in labels:
            raise DataError(f"image-label list {list_path} has no line for {name!r} (listed at "
                            f"{where}); add '{name} <classes>' to it or set image_labels=masks")
