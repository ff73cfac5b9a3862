"""Training preprocessing (REFERENCE 4.4): mirror, scale, normalise, crop with centred padding.

Differences from the reference, by design: the random crop start is drawn from
[0, size - crop] (no off-by-one, QUIRK 24), no Canny edge map is computed (QUIRK 27), and the
random numbers come from an explicit `numpy.random.Generator` so that a sample can be
reproduced from its seed regardless of which worker produced it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

IGNORE_INDEX = 255


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(img / 255 - mean) / std per channel.

    Args:
        img: uint8 (or float in 0-255) [H, W, 3] RGB.
        mean, std: 3 values each, RGB, on the 0-1 scale.
    Returns:
        float32 [H, W, 3].
    """
    m = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
    return (img.astype(np.float32) / np.float32(255.0) - m) / s


def random_mirror(img: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
    """Horizontal flip of image [H,W,3] and label [H,W] together with probability 0.5."""
    if rng.random() >= 0.5:
        img = img[:, ::-1]
        if label is not None:
            label = label[:, ::-1]
    return img, label


def random_scale(img: np.ndarray, label: Optional[np.ndarray], scales: Sequence[float],
                 rng: np.random.Generator, mode: str = "choice"):
    """Resize by a factor drawn with :func:`draw_scale` (default: uniformly from `scales`).

    The new size is (int(H*s), int(W*s)); bilinear for the image (uint8), nearest for the label.
    Returns (img, label, s).
    """
    s = draw_scale(scales, rng, mode)
    h, w = img.shape[:2]
    nh, nw = max(1, int(h * s)), max(1, int(w * s))
    if (nh, nw) != (h, w):
        img = cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(np.ascontiguousarray(label), (nw, nh), interpolation=cv2.INTER_NEAREST)
    return img, label, s


SCALE_MODES = ("choice", "u2pl", "resize")


def draw_scale(scales: Sequence[float], rng: np.random.Generator, mode: str = "choice") -> float:
    """One random scale factor.

    mode 'choice': uniform over the listed `scales`.
    mode 'u2pl' (U2PL's RandResize): with probability 0.5 s ~ U[lo, 1.0), else s ~ U[1.0, hi),
    lo = min(scales), hi = max(scales) (U2PL: [0.5, 2.0]). Not U[lo, hi]: half of the draws
    shrink, half enlarge, whatever the interval lengths.
    """
    if mode == "choice":
        return float(scales[int(rng.integers(len(scales)))])
    if mode == "u2pl":
        lo, hi = float(min(scales)), float(max(scales))
        if rng.random() < 0.5:
            return lo + (1.0 - lo) * float(rng.random())
        return 1.0 + (hi - 1.0) * float(rng.random())
    raise ValueError(f"train_scale_mode must be one of {SCALE_MODES}, got {mode!r}")


def crop_start(size: int, crop: int, rng: np.random.Generator) -> int:
    """Crop start along one axis: uniform in [0, size - crop] (inclusive) if size > crop, else 0."""
    return int(rng.integers(0, size - crop + 1)) if size > crop else 0


def random_crop_pad(img: np.ndarray, label: Optional[np.ndarray], crop_hw: Tuple[int, int],
                    rng: np.random.Generator, img_pad: float = 0.0,
                    label_pad: int = IGNORE_INDEX):
    """Random crop to crop_hw, then centred padding to exactly crop_hw.

    Per axis the start is uniform in [0, size - crop] when size > crop, else 0. Padding puts
    floor(pad/2) before and ceil(pad/2) after; the image gets `img_pad`, the label `label_pad`.
    Args:
        img: [H, W, C] any dtype; label: [H, W] or None.
    Returns:
        (img [ch, cw, C], label [ch, cw] or None).
    """
    ch, cw = int(crop_hw[0]), int(crop_hw[1])
    h, w = img.shape[:2]
    y0, x0 = crop_start(h, ch, rng), crop_start(w, cw, rng)
    img = img[y0:y0 + ch, x0:x0 + cw]
    if label is not None:
        label = label[y0:y0 + ch, x0:x0 + cw]
    return _pad_centred(img, label, (ch, cw), img_pad, label_pad)


def _pad_centred(img: np.ndarray, label: Optional[np.ndarray], crop_hw: Tuple[int, int],
                 img_pad: float, label_pad: int):
    """Pad img [h,w,C] / label [h,w] to crop_hw: floor(pad/2) before, ceil(pad/2) after."""
    ch, cw = crop_hw
    ph, pw = ch - img.shape[0], cw - img.shape[1]
    if ph <= 0 and pw <= 0:
        return img, label
    top, left = ph // 2, pw // 2
    out = np.full((ch, cw) + img.shape[2:], img_pad, dtype=img.dtype)
    out[top:top + img.shape[0], left:left + img.shape[1]] = img
    if label is not None:
        lab = np.full((ch, cw), label_pad, dtype=label.dtype)
        lab[top:top + label.shape[0], left:left + label.shape[1]] = label
        label = lab
    return out, label


class TrainTransform:
    """The reference `TrainPre` without its quirks (see module docstring).

    Args:
        crop_hw: (height, width) of the output crop in pixels.
        scales: candidate scale factors (e.g. [0.5, 0.75, 1, 1.5, 1.75, 2.0]); with
            scale_mode 'u2pl' only their min and max are used (see :func:`draw_scale`).
        mean, std: RGB normalisation on the 0-1 scale.
        scale_mode: 'choice' (one of `scales`) or 'u2pl' (two-interval draw), each followed
            by the random crop; or 'resize' (ELN's VOC): resize to exactly crop_hw, ignoring
            the aspect ratio (image bilinear in float, label nearest), then the flip, no scale
            draw and no crop.
        label_pad: label value of the padded border (255 = ignore; U2PL pads with 0).
    Call:
        transform(img, label, rng) with img uint8 [H,W,3] RGB, label uint8 [H,W] or None and a
        `numpy.random.Generator`; returns (float32 [3, ch, cw], int64 [ch, cw] or None).
        Padding: image 0.0 after normalisation (the mean colour), label `label_pad`; top/left
        get floor(pad/2), as U2PL's Crop.
    """

    def __init__(self, crop_hw: Tuple[int, int], scales: Sequence[float] = (1.0,),
                 mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), scale_mode: str = "choice",
                 label_pad: int = IGNORE_INDEX):
        if len(crop_hw) != 2 or int(crop_hw[0]) < 1 or int(crop_hw[1]) < 1:
            raise ValueError(f"TrainTransform: crop size must be two positive ints "
                             f"(image_height, image_width), got {crop_hw}")
        if len(scales) == 0 or any(float(s) <= 0 for s in scales):
            raise ValueError(f"TrainTransform: train_scale_array must be non-empty positive "
                             f"factors, got {list(scales)}")
        if len(mean) != 3 or len(std) != 3 or any(float(s) == 0 for s in std):
            raise ValueError(f"TrainTransform: image_mean/image_std need 3 values (std non-zero), "
                             f"got mean={list(mean)} std={list(std)}")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"TrainTransform: train_scale_mode must be one of {SCALE_MODES}, "
                             f"got {scale_mode!r}")
        if scale_mode == "u2pl" and not min(float(s) for s in scales) <= 1.0 <= max(
                float(s) for s in scales):
            raise ValueError(f"TrainTransform: train_scale_mode 'u2pl' draws from [min, 1) and "
                             f"[1, max) of train_scale_array, which must enclose 1; got "
                             f"{list(scales)} (U2PL: [0.5, 2.0])")
        if isinstance(label_pad, bool) or int(label_pad) != label_pad or \
                not 0 <= int(label_pad) <= 255:
            raise ValueError(f"TrainTransform: train_label_pad must be an integer in 0..255, "
                             f"got {label_pad!r}")
        self.crop_hw = (int(crop_hw[0]), int(crop_hw[1]))
        self.scales = [float(s) for s in scales]
        self.scale_mode = scale_mode
        self.label_pad = int(label_pad)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, img: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
        if self.scale_mode == "resize":
            return self._resize(img, label, rng)
        img, label = random_mirror(img, label, rng)
        img, label, _ = random_scale(img, label, self.scales, rng, self.scale_mode)
        # Crop the uint8 image, normalise only the crop, then pad with 0.0: identical to the
        # reference's normalise-then-crop-and-pad, at a fraction of the cost.
        ch, cw = self.crop_hw
        h, w = img.shape[:2]
        y0, x0 = crop_start(h, ch, rng), crop_start(w, cw, rng)
        img = normalize(img[y0:y0 + ch, x0:x0 + cw], self.mean, self.std)
        if label is not None:
            label = label[y0:y0 + ch, x0:x0 + cw]
        img, label = _pad_centred(img, label, self.crop_hw, 0.0, self.label_pad)
        data = np.ascontiguousarray(img.transpose(2, 0, 1))
        if label is not None:
            label = label.astype(np.int64)
        return data, label

    def _resize(self, img: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
        """Mode 'resize': the image (as float, no rounding to uint8) bilinear and the label
        nearest (source index floor(i * in / out)) to crop_hw, then the flip."""
        ch, cw = self.crop_hw
        img = cv2.resize(np.ascontiguousarray(img, dtype=np.float32), (cw, ch),
                         interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(np.ascontiguousarray(label), (cw, ch),
                               interpolation=cv2.INTER_NEAREST)
        img, label = random_mirror(img, label, rng)
        data = np.ascontiguousarray(normalize(img, self.mean, self.std).transpose(2, 0, 1))
        if label is not None:
            label = np.ascontiguousarray(label).astype(np.int64)
        return data, label
