"""Procedural demo segmentation dataset in the VOC layout.

    python -m furnace.data.demo [--root DATA/demo] [--seed 0] [--force]

Each image is a textured, low-saturation background (smooth noise, gradient, stripes or checks,
with grey clutter lines and pixel noise) with several saturated objects of 5 shape classes
(disc, square, triangle, ring, bar) of random size, rotation, position and overlap. Saturation
separates objects from the background. The hue circle is cut into 5 x HUE_BANDS_PER_CLASS
bands dealt to the classes in turn (band j belongs to class 1 + j mod 5, so neighbouring bands
belong to different classes), and HUE_HINT of the objects take a hue from the middle of one of
their class's bands, the others any hue. Shape and colour then agree, but the colour rule is
a fine, interleaved function of hue: thousands of labelled objects pin it down within the
demo's budget, a dozen labelled images sample each band only a few times. Later objects
occlude earlier ones; the label is the visible class (0 = background). Images and labels are
lossless PNGs (labels are palette PNGs holding the class indices), so the same seed gives the
same bytes.

Layout under root (as the CPS 'pascal_voc' archive):
    train_aug/image/<id>.png  train_aug/label/<id>.png  val/image/<id>.png  val/label/<id>.png
    train_aug.txt  val.txt
    subset_train_aug/train_aug_{labeled,unlabeled}_1-{2,4,8,16,32,64,80,128}.txt
    image_labels.txt  (every train and val image's classes, '<id> <c1> <c2> ...'; the same
                       as derived from the masks, written so that the list path is exercised)
    lpl_labeled.txt  lpl_all.txt  (LPL's lists: the 1/80 labelled list in its order; those
                       ids first, then the rest of train_aug.txt)
    demo_stamp.json (written last; marks a complete dataset)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from .datasets import DataError
from .image_labels import classes_line, image_level_label
from .lpl_splits import lpl_lists
from .palettes import voc_palette
from .splits import make_splits, split_file_names

DEMO_CLASSES: List[str] = ["background", "disc", "square", "triangle", "ring", "bar"]
DEMO_NUM_CLASSES = len(DEMO_CLASSES)
DEMO_VERSION = 3
DEMO_RATIOS = (2, 4, 8, 16, 32, 64, 80, 128)
STAMP_NAME = "demo_stamp.json"
HUE_HINT = 1.0  # share of objects whose hue lies in one of their class's bands
HUE_BANDS_PER_CLASS = 3
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "DATA" / "demo"
LPL_RATIO = 80  # the split of LPL's demo lists (exp_demo's labeled_ratio)
# lists beyond the splits; the stamp names them, so older data without them is remade (the
# images and labels come out byte-identical)
EXTRA_LISTS = ("image_labels.txt", "lpl_labeled.txt", "lpl_all.txt")

_SPLIT_CODE = {"train": 1, "val": 2}
_PALETTE_BYTES = voc_palette(256).tobytes()


# ------------------------------------------------------------------------------ drawing

def _background(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """float32 [s, s, 3] textured, low-saturation background in 0..255."""
    # two greyish colours (a slight tint), so that saturated objects stand out from it
    base = rng.uniform(50, 170, 2).astype(np.float32)
    c0 = base[0] + rng.uniform(-15, 15, 3).astype(np.float32)
    c1 = base[1] + rng.uniform(-15, 15, 3).astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:  # smooth noise: coarse random grid upsampled
        g = int(rng.integers(3, 9))
        coarse = rng.uniform(0, 1, (g, g, 1)).astype(np.float32)
        t = cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC)[..., None]
    elif kind == 1:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy) / s + 0.5
    elif kind == 2:  # sinusoidal stripes
        a = rng.uniform(0, np.pi)
        f = rng.uniform(2, 10) * 2 * np.pi / s
        t = 0.5 + 0.5 * np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 6.3))
    else:  # checks
        p = int(rng.integers(6, 24))
        t = (((yy.astype(np.int32) // p) + (xx.astype(np.int32) // p)) % 2).astype(np.float32)
    t = np.clip(t, 0, 1).astype(np.float32)
    if t.ndim == 2:
        t = t[..., None]
    return c0 * (1 - t) + c1 * t


def _clutter(img: np.ndarray, rng: np.random.Generator, s: int) -> None:
    """Thin background lines (label stays background), so that 'bar' needs more than edges."""
    for _ in range(int(rng.integers(0, 4))):
        p0 = tuple(int(v) for v in rng.integers(0, s, 2))
        p1 = tuple(int(v) for v in rng.integers(0, s, 2))
        col = (float(rng.uniform(40, 200)),) * 3  # grey: clutter is never a saturated object
        cv2.line(img, p0, p1, col, int(rng.integers(1, 3)), lineType=cv2.LINE_8)


def _shape_mask(cls: int, dy: np.ndarray, dx: np.ndarray, r: float, theta: float,
                rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of shape `cls` centred at 0 given pixel offsets dy, dx (float arrays)."""
    c, sn = np.cos(theta), np.sin(theta)
    u = c * dx + sn * dy       # rotated coordinates
    v = -sn * dx + c * dy
    if cls == 1:  # disc
        return dx * dx + dy * dy <= r * r
    if cls == 2:  # square, half side 0.8 r
        a = 0.8 * r
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if cls == 3:  # equilateral triangle, circumradius 1.2 r: three half-planes at the inradius
        m = np.ones(dx.shape, dtype=bool)
        for k in range(3):
            phi = theta + np.pi / 3 + k * 2 * np.pi / 3
            m &= (np.cos(phi) * dx + np.sin(phi) * dy) <= 0.6 * r
        return m
    if cls == 4:  # ring
        d2 = dx * dx + dy * dy
        ri = r * rng.uniform(0.45, 0.7)
        return (d2 <= r * r) & (d2 >= ri * ri)
    # bar: long thin rotated rectangle
    half_len = r * rng.uniform(1.3, 2.2)
    half_w = max(2.5, r * rng.uniform(0.18, 0.3))
    return (np.abs(u) <= half_len) & (np.abs(v) <= half_w)


def _object_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A saturated colour (float32 RGB in 0..255). The saturation says 'object'. With
    probability HUE_HINT the hue lies in one of the class's HUE_BANDS_PER_CLASS bands (its
    central 70 %, so bands of different classes never touch), otherwise anywhere."""
    if rng.random() < HUE_HINT:
        k = DEMO_NUM_CLASSES - 1
        n_bands = k * HUE_BANDS_PER_CLASS
        band = (cls - 1) + k * int(rng.integers(HUE_BANDS_PER_CLASS))  # band j: class 1 + j % k
        hue = (band + rng.uniform(0.15, 0.85)) * 180.0 / n_bands  # OpenCV hue runs over 0..180
    else:
        hue = rng.uniform(0, 180)
    hsv = np.array([[[hue, rng.uniform(170, 255), rng.uniform(150, 255)]]], dtype=np.float32)
    rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return rgb.reshape(3).astype(np.float32)


def draw_sample(rng: np.random.Generator, size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """One demo sample: (uint8 RGB image [size, size, 3], uint8 label [size, size] in 0..5)."""
    s = int(size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = _background(rng, s, yy, xx)
    _clutter(img, rng, s)
    label = np.zeros((s, s), dtype=np.uint8)
    for _ in range(int(rng.integers(3, 8))):
        cls = int(rng.integers(1, DEMO_NUM_CLASSES))
        r = float(rng.uniform(0.08, 0.26) * s)
        cy, cx = rng.uniform(-0.05 * s, 1.05 * s, 2)
        theta = float(rng.uniform(0, 2 * np.pi))
        ext = 2.3 * r  # bounding half-extent for every shape (bars are the longest)
        y0, y1 = max(0, int(cy - ext)), min(s, int(cy + ext) + 1)
        x0, x1 = max(0, int(cx - ext)), min(s, int(cx + ext) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        m = _shape_mask(cls, yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx, r, theta, rng)
        if m.sum() < 12:
            continue  # drop slivers at the border
        col = _object_colour(rng, cls)
        # object texture: a mild gradient across the object (shading)
        a = rng.uniform(0, 2 * np.pi)
        shade = 1.0 + rng.uniform(0.0, 0.35) * (
            (np.cos(a) * (xx[y0:y1, x0:x1] - cx) + np.sin(a) * (yy[y0:y1, x0:x1] - cy)) / (2 * r))
        patch = img[y0:y1, x0:x1]
        patch[m] = np.clip(col[None, :] * shade[m][:, None], 0, 255)
        label[y0:y1, x0:x1][m] = cls
    # light pixel noise on half the images (heavier noise bloats the lossless PNGs)
    sigma = rng.uniform(0, 4) if rng.random() < 0.5 else 0.0
    if sigma > 0.5:
        img += rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


# ------------------------------------------------------------------------------ writing

def _write_image(path: str, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError(f"cannot encode demo image {path}")
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _write_label(path: str, label: np.ndarray) -> None:
    h, w = label.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    im.putpalette(_PALETTE_BYTES)  # palette PNG: viewers show colours, readers get indices
    im.save(path, format="PNG", optimize=False)


def _stamp(seed: int, n_train: int, n_val: int, size: int) -> Dict:
    return {"version": DEMO_VERSION, "seed": int(seed), "n_train": int(n_train),
            "n_val": int(n_val), "size": int(size), "classes": DEMO_CLASSES,
            "ratios": list(DEMO_RATIOS), "lists": list(EXTRA_LISTS)}


def is_complete(root, seed: int = 0, n_train: int = 1000, n_val: int = 200,
                size: int = 128) -> bool:
    """True if `root` holds a finished demo dataset made with these parameters."""
    p = Path(root) / STAMP_NAME
    try:
        return json.loads(p.read_text()) == _stamp(seed, n_train, n_val, size)
    except (OSError, ValueError):
        return False


# Every file the generator writes, relative to root (any seed, counts and ratios).
_OWN_FILE = re.compile(r"^(?:train_aug/(?:image|label)/demo_train_\d{5,}\.png"
                       r"|val/(?:image|label)/demo_val_\d{5,}\.png"
                       r"|train_aug\.txt|val\.txt|" + re.escape(STAMP_NAME) +
                       "".join("|" + re.escape(n) for n in EXTRA_LISTS) +
                       r"|subset_train_aug/train_aug_(?:labeled|unlabeled)_1-\d+\.txt)$")


def _foreign_file(root: Path) -> Optional[str]:
    """The first file under ``root`` the generator did not write (None if there is none)."""
    for dp, dn, fs in os.walk(root):
        rel = Path(dp).relative_to(root)
        for d in sorted(dn):
            if (Path(dp) / d).is_symlink():
                return str(rel / d)
        for f in sorted(fs):
            if not _OWN_FILE.match((rel / f).as_posix()) or (Path(dp) / f).is_symlink():
                return str(rel / f)
    return None


def _may_replace(root: Path) -> Optional[str]:
    """Why ``root`` must not be replaced, or None. Only a folder this module wrote (it holds
    the stamp file) or an empty one may be replaced, and only when every file in it is one
    the generator writes: a user's data folder, or a file a user put into the demo folder,
    must never be deleted."""
    if not root.exists() and not root.is_symlink():
        return None
    if not root.is_dir() or root.is_symlink():
        return "is not a folder"
    if not any(root.iterdir()):
        return None
    if not (root / STAMP_NAME).is_file():
        return f"holds files the demo generator did not write (no {STAMP_NAME})"
    foreign = _foreign_file(root)
    if foreign is not None:
        return f"holds a file the demo generator did not write ({foreign})"
    return None


def generate(root=None, n_train: int = 1000, n_val: int = 200, size: int = 128, seed: int = 0,
             verbose: bool = True) -> Dict:
    """Write the demo dataset to `root` (default <repo>/DATA/demo), replacing an older one.

    Args:
        root: output folder; built in a temporary sibling folder and renamed into place.
        n_train, n_val: image counts; size: image side in pixels; seed: generator seed.
    Returns:
        {'root', 'seconds', 'train_freq', 'val_freq'}: pixel frequency per class (lists of
        floats summing to 1, in DEMO_CLASSES order).
    """
    t0 = time.perf_counter()
    root = Path(root) if root is not None else DEFAULT_ROOT
    root = root.expanduser().absolute()
    what = _may_replace(root)
    if what:
        raise DataError(f"demo data root {root} {what}; refusing to replace it. Move that "
                        f"out, pass another --root (or dataset_path), or empty the folder")
    if n_train < 2 or n_val < 1:
        raise DataError(f"demo needs n_train >= 2 and n_val >= 1, got {n_train}, {n_val}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    freqs = {}
    ids_by_split = {}
    class_lines = []
    for split, count in (("train", n_train), ("val", n_val)):
        folder = "train_aug" if split == "train" else "val"
        (tmp / folder / "image").mkdir(parents=True)
        (tmp / folder / "label").mkdir(parents=True)
        hist = np.zeros(DEMO_NUM_CLASSES, dtype=np.int64)
        ids = []
        for i in range(count):
            # per-image RNG: an image does not depend on the others (counts, order)
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _SPLIT_CODE[split], i])
            img, lab = draw_sample(rng, size)
            sid = f"demo_{split}_{i:05d}"
            _write_image(str(tmp / folder / "image" / f"{sid}.png"), img)
            _write_label(str(tmp / folder / "label" / f"{sid}.png"), lab)
            hist += np.bincount(lab.ravel(), minlength=DEMO_NUM_CLASSES)
            ids.append(sid)
            class_lines.append(classes_line(sid, image_level_label(lab, DEMO_NUM_CLASSES)))
        ids_by_split[split] = ids
        freqs[split] = (hist / max(1, hist.sum())).tolist()
    (tmp / "train_aug.txt").write_text("".join(i + "\n" for i in ids_by_split["train"]))
    (tmp / "val.txt").write_text("".join(i + "\n" for i in ids_by_split["val"]))
    sub = tmp / "subset_train_aug"
    sub.mkdir()
    splits = make_splits(ids_by_split["train"], DEMO_RATIOS, seed)
    for r, (lab, unlab) in splits.items():
        ln, un = split_file_names(r)
        (sub / ln).write_text("".join(x + "\n" for x in lab))
        (sub / un).write_text("".join(x + "\n" for x in unlab))
    (tmp / "image_labels.txt").write_text("".join(x + "\n" for x in class_lines))
    lab = splits[LPL_RATIO][0]
    subsets, d = lpl_lists(list(enumerate(lab, 1)), list(enumerate(ids_by_split["train"], 1)),
                           [len(lab)])
    (tmp / "lpl_labeled.txt").write_text("".join(x + "\n" for x in subsets[len(lab)]))
    (tmp / "lpl_all.txt").write_text("".join(x + "\n" for x in d))
    (tmp / STAMP_NAME).write_text(json.dumps(_stamp(seed, n_train, n_val, size), indent=1))
    # swap into place; another process may have finished first, which is fine
    if root.exists():
        what = _may_replace(root)  # checked again: files may have arrived meanwhile
        if what:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"demo data root {root} {what} (it arrived while generating); "
                            f"refusing to replace it (the new data was discarded)")
        shutil.rmtree(root)
    try:
        os.rename(tmp, root)
    except OSError:
        if is_complete(root, seed, n_train, n_val, size):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    secs = time.perf_counter() - t0
    if verbose:
        print(f"demo data: {n_train} train + {n_val} val images of {size}x{size} in {root} "
              f"({secs:.1f} s)")
        for split in ("train", "val"):
            print(f"  class pixel frequencies ({split}): " + ", ".join(
                f"{c} {100 * f:.1f}%" for c, f in zip(DEMO_CLASSES, freqs[split])))
    return {"root": str(root), "seconds": secs, "train_freq": freqs["train"],
            "val_freq": freqs["val"]}


def ensure_demo_data(root=None, seed: int = 0, n_train: int = 1000, n_val: int = 200,
                     size: int = 128, verbose: bool = True) -> str:
    """Generate the demo dataset unless `root` already holds a complete one with the same
    parameters (stamp file). Returns the root path as a string."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not is_complete(root, seed, n_train, n_val, size):
        generate(root, n_train, n_val, size, seed, verbose)
    return str(root.expanduser().absolute())


def prepare_from_config(C) -> None:
    """Generate the demo dataset at ``C.dataset_path`` when the config asks for it
    (``generate_demo_data``, set by exp_demo) and it is not there yet."""
    if C.get("generate_demo_data"):
        ensure_demo_data(C.dataset_path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m furnace.data.demo",
                                 description="Generate the procedural demo dataset (VOC layout).")
    ap.add_argument("--root", default=str(DEFAULT_ROOT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--force", action="store_true", help="regenerate even if complete")
    a = ap.parse_args(argv)
    try:
        if not a.force and is_complete(a.root, a.seed, a.n_train, a.n_val, a.size):
            print(f"demo data already complete in {a.root} (use --force to regenerate)")
            return 0
        generate(a.root, a.n_train, a.n_val, a.size, a.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
