"""A weak/strong unlabelled sample (ELN, spec methods/ELN.md 3.4): the strong view is the
weak view's very crop (one geometry, pixel-aligned), colour-jittered as torchvision's
``ColorJitter(0.4, 0.4, 0.4, 0.1)`` (applied always, the four jitters in a fresh random order)
then ``RandomGrayscale(0.2)``, on the [0, 1] image, normalised afterwards.

:func:`weak_strong_collate` is a stream collate (:class:`~furnace.data.StreamSpec`): the
batch's ``data`` is the weak view, ``strong`` the strong one. The jitter's draws come from
each sample's private seed, so batches do not depend on the loader workers (and a resumed run
draws the same).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torchvision.transforms.functional as TF
from torch.utils.data import default_collate

from .cutmix import SEED_KEY

JITTER = (0.4, 0.4, 0.4, 0.1)   # brightness, contrast, saturation, hue
GRAY_P = 0.2


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g))


def strong_view(img: torch.Tensor, g: torch.Generator, jitter: Sequence[float] = JITTER,
                gray_p: float = GRAY_P) -> torch.Tensor:
    """The strong view of one [3,H,W] image in [0, 1] (torchvision's ColorJitter and
    RandomGrayscale draws, from ``g``)."""
    b, c, s, h = jitter
    order = torch.randperm(4, generator=g).tolist()
    factors = [_uniform(g, max(0.0, 1 - b), 1 + b), _uniform(g, max(0.0, 1 - c), 1 + c),
               _uniform(g, max(0.0, 1 - s), 1 + s), _uniform(g, -h, h)]
    for k in order:
        if k == 0:
            img = TF.adjust_brightness(img, factors[0])
        elif k == 1:
            img = TF.adjust_contrast(img, factors[1])
        elif k == 2:
            img = TF.adjust_saturation(img, factors[2])
        else:
            img = TF.adjust_hue(img, factors[3])
    if float(torch.rand(1, generator=g)) < gray_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return img


def _generator(seed: Optional[Sequence[int]]) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        v = 0x5354524F  # 'STRO'
        for x in seed:
            v = (v * 1_000_003 + int(x)) % (2 ** 63)
        g.manual_seed(v)
    return g


class WeakStrongCollate:
    """Collate adding ``strong`` [B,3,H,W] (normalised) to a batch of normalised ``data``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 jitter: Sequence[float] = JITTER, gray_p: float = GRAY_P):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.jitter, self.gray_p = tuple(jitter), float(gray_p)

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        seeds = [s.pop(SEED_KEY, None) for s in samples]
        strong = []
        for s, seed in zip(samples, seeds):
            raw = (s["data"].float() * self.std + self.mean).clamp(0, 1)
            view = strong_view(raw, _generator(seed), self.jitter, self.gray_p)
            strong.append((view - self.mean) / self.std)
        batch = default_collate(samples)
        batch["strong"] = torch.stack(strong)
        return batch


def weak_strong_collate(C) -> Callable:
    """The collate of ELN's unlabelled stream (``C.image_mean`` / ``C.image_std``; the jitter
    and grayscale probability from ``C.eln.strong_jitter`` / ``C.eln.strong_gray_p`` when the
    config has them, else the reference's)."""
    group = C.get("eln") or {}
    return WeakStrongCollate(C.image_mean, C.image_std, group.get("strong_jitter", JITTER),
                             group.get("strong_gray_p", GRAY_P))
