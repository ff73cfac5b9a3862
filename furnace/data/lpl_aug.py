"""LPL's training augmentations (spec methods/LPL.md 6.5, section 11): the strong
RandAugment-like pipeline and the crop-only weak pipeline.

Strong (K = ``augtime`` = 2): k ~ U{0..K}; k colour ops drawn with replacement from the 9 PIL
ops of :data:`COLOUR_OPS`, applied in draw order to the uint8 RGB image; then K - k geometric
ops drawn with replacement from :data:`GEOMETRIC_OPS` (image and label together); normalise;
random crop. Weak: normalise; random crop.

The crop follows the reference: along a side longer than the crop a uniform integer offset
into the image; along a shorter side the image goes to a uniform integer offset inside the
canvas (image 0.0 after normalisation, the mean colour; label 255). (The framework's
:class:`~furnace.data.transforms.TrainTransform` centres its padding instead.)

The parameter ranges are the reference's config values, as module constants named for its
keys. Every random number comes from the ``numpy.random.Generator`` passed in (the reference
draws from Python's ``random``), so a sample depends on its seed only, not on the loader
workers; the distributions are the reference's, the draws are not bit-identical to it.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .datasets import _cfg
from .transforms import IGNORE_INDEX, normalize

# the reference's config.py values (experiment/deeplabv3+_voc_swsss)
DATA_AUGTIME = 2                          # K of the strong pipeline (the weak one is K = 0)
DATA_RANDOMSCALE = (0.5, 2.0)             # scale factor s ~ U[lo, hi)
DATA_RANDOMFLIP = 0.5                     # probability of the horizontal flip
DATA_RANDOMAUTOCONTRAST = (0.0, 1.0)      # blend alpha
DATA_RANDOMBRIGHTNESS = (0.5, 1.5)        # enhance factor
DATA_RANDOMCOLOR = (0.5, 1.5)             # enhance factor (saturation)
DATA_RANDOMCONTRAST = (0.5, 1.5)          # enhance factor
DATA_RANDOMEQUALIZE = (0.5, 1.5)          # blend alpha (> 1 extrapolates)
DATA_RANDOMINVERT = (0.0, 1.0)            # blend alpha
DATA_RANDOMPOSTERIZE = (1, 8)             # bits kept, integer, both ends included
DATA_RANDOMSHARPNESS = (0.0, 1.0)         # enhance factor (< 1 smooths)
DATA_RANDOMSOLARIZE = (0.0, 1.0)          # threshold / 255
DATA_RANDOMSHEARX = (-0.3, 0.3)           # a_x
DATA_RANDOMSHEARY = (-0.3, 0.3)           # a_y
DATA_RANDOMROTATION = (-45, 45)           # degrees, integer, both ends included

Fill = Tuple[int, int, int]


def border_fill(mean: Sequence[float]) -> Fill:
    """The border colour of shear and rotation: int(255 * mean) per channel, uint8 RGB
    ((123, 116, 103) for the ImageNet mean)."""
    return tuple(int(float(m) * 255) for m in mean)


# ----------------------------------------------------------------------------- colour ops
# Each: (PIL RGB image, rng) -> PIL RGB image. Image.blend(a, b, alpha) = a (1 - alpha) + b alpha,
# clipped to 0..255.

def autocontrast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    alpha = rng.uniform(*DATA_RANDOMAUTOCONTRAST)
    return Image.blend(ImageOps.autocontrast(img), img, alpha)


def brightness(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(rng.uniform(*DATA_RANDOMBRIGHTNESS))


def color(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Color(img).enhance(rng.uniform(*DATA_RANDOMCOLOR))


def contrast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(rng.uniform(*DATA_RANDOMCONTRAST))


def equalize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    alpha = rng.uniform(*DATA_RANDOMEQUALIZE)
    return Image.blend(ImageOps.equalize(img), img, alpha)


def invert(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    alpha = rng.uniform(*DATA_RANDOMINVERT)
    return Image.blend(ImageOps.invert(img), img, alpha)


def posterize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    lo, hi = DATA_RANDOMPOSTERIZE
    return ImageOps.posterize(img, int(rng.integers(lo, hi + 1)))


def sharpness(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(rng.uniform(*DATA_RANDOMSHARPNESS))


def solarize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.solarize(img, rng.uniform(*DATA_RANDOMSOLARIZE) * 255)


#: the 9 colour ops, in the reference's order (a draw picks an index into this)
COLOUR_OPS: Dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "autocontrast": autocontrast, "brightness": brightness, "color": color,
    "contrast": contrast, "equalize": equalize, "invert": invert, "posterize": posterize,
    "sharpness": sharpness, "solarize": solarize}


# ----------------------------------------------------------------------------- geometric ops
# Deterministic forms (given the parameter) and random forms (drawing it from rng). Images are
# uint8 [H,W,3] RGB, labels uint8 [H,W] or None; OpenCV bicubic for images, nearest for labels.

Geo = Tuple[np.ndarray, Optional[np.ndarray]]


def scale_by(img: np.ndarray, label: Optional[np.ndarray], s: float) -> Geo:
    """Resize by s with ``cv2.resize(fx=s, fy=s)``: the output side is round(side * s), half
    to even (17 x 0.5 -> 8, 21 x 1.5 -> 32), and the sampling uses s itself."""
    h, w = img.shape[:2]
    # a side that would round to 0 pixels (only for images 1 pixel wide) keeps one
    size = None if round(h * s) >= 1 and round(w * s) >= 1 else (max(1, round(w * s)),
                                                                 max(1, round(h * s)))
    img = cv2.resize(np.ascontiguousarray(img), size, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
    if label is not None:
        label = cv2.resize(np.ascontiguousarray(label), size, fx=s, fy=s,
                           interpolation=cv2.INTER_NEAREST)
    return img, label


def mirror(img: np.ndarray, label: Optional[np.ndarray]) -> Geo:
    """Horizontal flip of image and label."""
    return img[:, ::-1], (None if label is None else label[:, ::-1])


def _warp(img: np.ndarray, label: Optional[np.ndarray], m: np.ndarray, fill: Fill) -> Geo:
    h, w = img.shape[:2]
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_CUBIC,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(v) for v in fill))
    if label is not None:
        label = cv2.warpAffine(np.ascontiguousarray(label), m, (w, h), flags=cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_INDEX)
    return img, label


def shear_matrix(ax: float, ay: float, h: int, w: int) -> np.ndarray:
    """The reference's shear, float32 [2, 3]: x' = x + a_x (y - W/2), y' = y + a_y (x - H/2)
    (section 11: the fixed point is the centre with x and y exchanged; the centre itself only
    for square images)."""
    m = np.float32([[1, ax, 0], [ay, 1, 0]])
    # float32 arithmetic as the reference, which fills a float32 matrix in place
    m[0, 2] = -m[0, 1] * w / 2
    m[1, 2] = -m[1, 0] * h / 2
    return m


def shear_by(img: np.ndarray, label: Optional[np.ndarray], ax: float, ay: float,
             fill: Fill) -> Geo:
    """Shear with :func:`shear_matrix`, same output size; border ``fill`` / label 255."""
    h, w = img.shape[:2]
    return _warp(img, label, shear_matrix(ax, ay, h, w), fill)


def rotate_by(img: np.ndarray, label: Optional[np.ndarray], angle: float, fill: Fill) -> Geo:
    """Rotation by ``angle`` degrees (counter-clockwise) about (W/2, H/2), scale 1, same output
    size; border ``fill`` / label 255."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(angle), 1)
    return _warp(img, label, m, fill)


def random_scale(img, label, rng: np.random.Generator, fill: Fill) -> Geo:
    lo, hi = DATA_RANDOMSCALE
    return scale_by(img, label, lo + (hi - lo) * rng.random())


def random_flip(img, label, rng: np.random.Generator, fill: Fill) -> Geo:
    return mirror(img, label) if rng.random() < DATA_RANDOMFLIP else (img, label)


def random_shear(img, label, rng: np.random.Generator, fill: Fill) -> Geo:
    ax = rng.uniform(*DATA_RANDOMSHEARX)
    ay = rng.uniform(*DATA_RANDOMSHEARY)
    return shear_by(img, label, ax, ay, fill)


def random_rotate(img, label, rng: np.random.Generator, fill: Fill) -> Geo:
    lo, hi = DATA_RANDOMROTATION
    return rotate_by(img, label, int(rng.integers(lo, hi + 1)), fill)


#: the 4 geometric ops, in the reference's order: (img, label, rng, fill) -> (img, label)
GEOMETRIC_OPS: Dict[str, Callable[..., Geo]] = {
    "scale": random_scale, "flip": random_flip, "shear": random_shear, "rotate": random_rotate}


# ----------------------------------------------------------------------------- crop

def crop_offsets(size: int, crop: int, rng: np.random.Generator) -> Tuple[int, int]:
    """(offset into the image, offset into the canvas) along one axis: a uniform integer in
    [0, size - crop] into the image when size > crop, else a uniform integer in
    [0, crop - size] into the canvas."""
    if size > crop:
        return int(rng.integers(0, size - crop + 1)), 0
    return 0, int(rng.integers(0, crop - size + 1))


def normalise_crop(img: np.ndarray, label: Optional[np.ndarray], crop_hw: Tuple[int, int],
                   mean: Sequence[float], std: Sequence[float],
                   rng: np.random.Generator) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Normalise, then the reference's random crop (offsets drawn x first, then y).

    Returns (float32 [3, ch, cw], uint8 [ch, cw] or None); outside the image the canvas is 0.0
    (image) and 255 (label). Only the kept part is normalised (the same values as normalising
    the whole image first).
    """
    ch, cw = int(crop_hw[0]), int(crop_hw[1])
    h, w = img.shape[:2]
    ix, cx = crop_offsets(w, cw, rng)
    iy, cy = crop_offsets(h, ch, rng)
    kh, kw = min(h, ch), min(w, cw)
    data = np.zeros((3, ch, cw), dtype=np.float32)
    data[:, cy:cy + kh, cx:cx + kw] = normalize(img[iy:iy + kh, ix:ix + kw], mean,
                                                std).transpose(2, 0, 1)
    if label is not None:
        out = np.full((ch, cw), IGNORE_INDEX, dtype=np.uint8)
        out[cy:cy + kh, cx:cx + kw] = label[iy:iy + kh, ix:ix + kw]
        label = out
    return data, label


# ----------------------------------------------------------------------------- pipelines

class _Pipeline:
    def __init__(self, crop_hw: Tuple[int, int], mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)):
        if len(crop_hw) != 2 or int(crop_hw[0]) < 1 or int(crop_hw[1]) < 1:
            raise ValueError(f"{type(self).__name__}: crop size must be two positive ints "
                             f"(image_height, image_width), got {crop_hw}")
        if len(mean) != 3 or len(std) != 3 or any(float(s) == 0 for s in std):
            raise ValueError(f"{type(self).__name__}: image_mean/image_std need 3 values "
                             f"(std non-zero), got mean={list(mean)} std={list(std)}")
        self.crop_hw = (int(crop_hw[0]), int(crop_hw[1]))
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]


class WeakTransform(_Pipeline):
    """LPL's weak pipeline: normalise + random crop (no flip, no scale, no colour op).

    Call: ``(img uint8 [H,W,3] RGB, label uint8 [H,W] or None, rng) -> (float32 [3,h,w],
    uint8 [h,w] or None)``, h x w = crop_hw.
    """

    def __call__(self, img: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
        return normalise_crop(img, label, self.crop_hw, self.mean, self.std, rng)


class StrongTransform(_Pipeline):
    """LPL's strong RandAugment-like pipeline (spec 6.5) with K = ``augtime``.

    Args:
        crop_hw: (height, width) of the crop in pixels.
        mean, std: RGB normalisation on the 0-1 scale; the border colour of shear and rotation
            is int(255 * mean).
        augtime: K; 0 gives the weak pipeline.
    Call: as :class:`WeakTransform`. Draw order: k, the k colour op indices, each colour op's
    parameter as it is applied, the K - k geometric op indices, each geometric op's parameter,
    the crop offsets.
    """

    def __init__(self, crop_hw: Tuple[int, int], mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), augtime: int = DATA_AUGTIME):
        super().__init__(crop_hw, mean, std)
        if isinstance(augtime, bool) or int(augtime) != augtime or augtime < 0:
            raise ValueError(f"StrongTransform: augtime must be an integer >= 0, got {augtime!r}")
        self.augtime = int(augtime)
        self.fill = border_fill(self.mean)

    def augment(self, img: np.ndarray, label: Optional[np.ndarray],
                rng: np.random.Generator) -> Geo:
        """The colour and geometric ops only (uint8 image and label, before normalising)."""
        k = int(rng.integers(0, self.augtime + 1))
        names = list(COLOUR_OPS)
        picks = rng.integers(0, len(names), size=k)
        if k:
            pil = Image.fromarray(np.ascontiguousarray(img))
            for i in picks:
                pil = COLOUR_OPS[names[int(i)]](pil, rng)
            img = np.asarray(pil)
        names = list(GEOMETRIC_OPS)
        for i in rng.integers(0, len(names), size=self.augtime - k):
            img, label = GEOMETRIC_OPS[names[int(i)]](img, label, rng, self.fill)
        return img, label

    def __call__(self, img: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
        img, label = self.augment(img, label, rng)
        return normalise_crop(img, label, self.crop_hw, self.mean, self.std, rng)


def _crop_and_norm(C) -> dict:
    return dict(crop_hw=(int(_cfg(C, "image_height")), int(_cfg(C, "image_width"))),
                mean=list(_cfg(C, "image_mean", [0.485, 0.456, 0.406])),
                std=list(_cfg(C, "image_std", [0.229, 0.224, 0.225])))


def strong_transform_from_config(C, augtime: int = DATA_AUGTIME) -> StrongTransform:
    """StrongTransform from image_height, image_width, image_mean, image_std; K = augtime."""
    return StrongTransform(augtime=augtime, **_crop_and_norm(C))


def weak_transform_from_config(C) -> WeakTransform:
    """WeakTransform from image_height, image_width, image_mean, image_std."""
    return WeakTransform(**_crop_and_norm(C))
