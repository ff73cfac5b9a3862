"""CutMix box masks (REFERENCE 3.5) and the collate that attaches them to a batch, and
U2PL's one-box CutMix within a batch (spec methods/U2PL.md 3.4 step 3).

A mask M is 1 where the mixed image takes the second unlabelled image:
``mixed = u0 * (1 - M) + u1 * M`` (REFERENCE 3.6).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import default_collate

SEED_KEY = "_seed"  # private per-sample key set by the training datasets (see datasets.py)


class BoxMaskGenerator:
    """Random rectangular CutMix masks.

    Args:
        prop_range: (low, high) proportion drawn uniformly per box. With `prop_by_area` it is the
            area fraction of all boxes together (each box gets prop / n_boxes of the image);
            otherwise it is the side-length fraction per axis.
        n_boxes: boxes per mask; they are combined by XOR when `invert` (overlaps flip back).
        random_aspect_ratio: draw the aspect ratio (only used with `prop_by_area`; without it
            each axis gets its own side fraction when True, a shared one when False).
        prop_by_area: see `prop_range`.
        within_bounds: boxes lie fully inside the image; otherwise the box centre is uniform
            over the image and the box is clipped at the border.
        invert: start from zeros and flip each box to 1 - region (the reference default);
            otherwise start from ones and flip (so boxes carve zeros).
    """

    def __init__(self, prop_range: Sequence[float] = (0.25, 0.5), n_boxes: int = 3,
                 random_aspect_ratio: bool = True, prop_by_area: bool = True,
                 within_bounds: bool = True, invert: bool = True):
        lo, hi = float(prop_range[0]), float(prop_range[1])
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"BoxMaskGenerator: prop_range must satisfy 0 <= low <= high <= 1, "
                             f"got {tuple(prop_range)}")
        if int(n_boxes) < 1:
            raise ValueError(f"BoxMaskGenerator: n_boxes must be >= 1, got {n_boxes}")
        self.prop_range = (lo, hi)
        self.n_boxes = int(n_boxes)
        self.random_aspect_ratio = bool(random_aspect_ratio)
        self.prop_by_area = bool(prop_by_area)
        self.within_bounds = bool(within_bounds)
        self.invert = bool(invert)

    def __repr__(self) -> str:
        return (f"BoxMaskGenerator(prop_range={self.prop_range}, n_boxes={self.n_boxes}, "
                f"random_aspect_ratio={self.random_aspect_ratio}, prop_by_area={self.prop_by_area}, "
                f"within_bounds={self.within_bounds}, invert={self.invert})")

    def rectangles(self, n: int, shape_hw: Tuple[int, int], rng=None) -> np.ndarray:
        """Draw box corners.

        Returns:
            int64 array [n, n_boxes, 4] of (y0, x0, y1, x1), half-open, in pixels, already
            clipped to the image.
        """
        rng = np.random if rng is None else rng
        lo, hi = self.prop_range
        k = self.n_boxes
        shape = np.array(shape_hw, dtype=np.float64)  # (H, W)
        if self.prop_by_area:
            area = rng.uniform(lo, hi, size=(n, k))
            zero = area == 0.0  # log(0) would give NaN sizes; such boxes are dropped
            if self.random_aspect_ratio:
                with np.errstate(divide="ignore", invalid="ignore"):
                    # yprop = area ** u written as exp(u log area): the draw order of the reference
                    yprop = np.exp(rng.uniform(0.0, 1.0, size=(n, k)) * np.log(area))
                    xprop = area / yprop
            else:
                yprop = np.sqrt(area)
                xprop = yprop.copy()
            # each box covers area / n_boxes of the image
            scale = np.sqrt(1.0 / k)
            yprop = yprop * scale
            xprop = xprop * scale
            yprop[zero] = 0.0
            xprop[zero] = 0.0
        else:
            if self.random_aspect_ratio:
                yprop = rng.uniform(lo, hi, size=(n, k))
                xprop = rng.uniform(lo, hi, size=(n, k))
            else:
                yprop = rng.uniform(lo, hi, size=(n, k))
                xprop = yprop.copy()
            scale = np.sqrt(1.0 / k)
            yprop = yprop * scale
            xprop = xprop * scale
        size = np.round(np.stack([yprop, xprop], axis=2) * shape)  # [n, k, 2] (h, w)
        if self.within_bounds:
            start = np.round((shape - size) * rng.uniform(0.0, 1.0, size=size.shape))
            end = start + size
        else:
            centre = np.round(shape * rng.uniform(0.0, 1.0, size=size.shape))
            start = centre - size * 0.5
            end = centre + size * 0.5
            # clip instead of letting negative starts wrap around in slicing
            start = np.clip(start, 0.0, shape)
            end = np.clip(end, 0.0, shape)
        rects = np.concatenate([start, end], axis=2)  # (y0, x0, y1, x1)
        return rects.astype(np.int64)

    def generate_params(self, n: int, shape_hw: Tuple[int, int], rng=None) -> np.ndarray:
        """Draw `n` masks.

        Args:
            n: number of masks (one per sample).
            shape_hw: (H, W) of the mask in pixels.
            rng: `np.random.RandomState` (or the `np.random` module, the default, as the
                reference does inside loader workers).
        Returns:
            float32 array [n, 1, H, W] with values in {0, 1}.
        """
        h, w = int(shape_hw[0]), int(shape_hw[1])
        rects = self.rectangles(n, (h, w), rng)
        masks = np.full((n, 1, h, w), 0.0 if self.invert else 1.0, dtype=np.float32)
        for i in range(n):
            m = masks[i, 0]
            for y0, x0, y1, x1 in rects[i]:
                # XOR: overlapping parts of later boxes flip back
                m[y0:y1, x0:x1] = 1.0 - m[y0:y1, x0:x1]
        return masks


def mask_generator_from_config(C) -> BoxMaskGenerator:
    """BoxMaskGenerator from the `cutmix_*` config keys (reference defaults when absent)."""
    g = C.get if hasattr(C, "get") else (lambda k, d=None: getattr(C, k, d))
    return BoxMaskGenerator(
        prop_range=tuple(g("cutmix_mask_prop_range", (0.25, 0.5))),
        n_boxes=int(g("cutmix_boxmask_n_boxes", 3)),
        random_aspect_ratio=not bool(g("cutmix_boxmask_fixed_aspect_ratio", False)),
        prop_by_area=not bool(g("cutmix_boxmask_by_size", False)),
        within_bounds=not bool(g("cutmix_boxmask_outside_bounds", False)),
        invert=not bool(g("cutmix_boxmask_no_invert", False)),
    )


def seg_collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """`default_collate` of sample dicts after dropping the private per-sample seed key.

    Batch: data float32 [B,3,H,W], label int64 [B,H,W] (labelled), fn list[str], n int64 [B].
    """
    for s in samples:
        s.pop(SEED_KEY, None)
    return default_collate(samples)


class MaskCollate:
    """Collate for unlabelled loader 0: adds batch['mask'] float32 [B, 1, H, W] (H, W of 'data').

    When every sample carries the private seed that the training datasets attach (epoch-tagged
    indices, as TrainLoaders uses), the mask RNG is derived from those seeds, so batches do not
    depend on the number of workers. Otherwise the global `np.random` is used (as the reference,
    whose workers are seeded by PyTorch).
    """

    def __init__(self, generator: Optional[BoxMaskGenerator] = None):
        self.generator = generator if generator is not None else BoxMaskGenerator()

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        seeds = [s.pop(SEED_KEY, None) for s in samples]
        if seeds and all(sd is not None for sd in seeds):
            entropy = [int(v) for sd in seeds for v in sd] + [0x6D61736B]  # 'mask' stream
            state = np.random.SeedSequence(entropy).generate_state(4)
            rng = np.random.RandomState(state)
        else:
            rng = np.random
        h, w = samples[0]["data"].shape[-2:]
        batch = default_collate(samples)
        masks = self.generator.generate_params(len(samples), (int(h), int(w)), rng)
        batch["mask"] = torch.from_numpy(masks)
        return batch


def half_box(rng: np.random.RandomState, h: int, w: int) -> Tuple[int, int, int, int]:
    """U2PL's CutMix box (x0, y0, bw, bh) covering about half of an h x w image.

    Width uniform in [floor(w/2 + 1), w - 1], height round-half-even(h*w/2 / width), position
    uniform inside the image; NumPy legacy draws in the order width, x0, y0 (the reference's
    ``generate_cutout_mask``, so a seeded RandomState gives its boxes)."""
    bw = int(rng.randint(int(w / 2 + 1), w))
    bh = int(np.round(h * w / 2 / bw))
    x0 = int(rng.randint(0, w - bw + 1))
    y0 = int(rng.randint(0, h - bh + 1))
    return x0, y0, bw, bh


def mix_with_next(boxes: Sequence[Tuple[int, int, int, int]],
                  *tensors: torch.Tensor) -> List[torch.Tensor]:
    """Image i keeps its content outside box i and takes the box region from image
    (i + 1) mod B, for every tensor alike ([B,...,H,W]: images, pseudo labels, confidences).
    One box per image; with B = 1 the partner is the image itself (no change)."""
    out = []
    for t in tensors:
        mixed = t.clone()
        for i, (x0, y0, bw, bh) in enumerate(boxes):
            j = (i + 1) % t.shape[0]
            mixed[i, ..., y0:y0 + bh, x0:x0 + bw] = t[j, ..., y0:y0 + bh, x0:x0 + bw]
        out.append(mixed)
    return out
