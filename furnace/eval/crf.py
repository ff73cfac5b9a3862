"""Dense CRF post-processing of a softmax map (LPL's retest, spec 4.4), with pydensecrf.

pydensecrf is an optional dependency (only a CRF evaluation needs it): the PyPI package
``pydensecrf2`` provides the ``pydensecrf`` import and builds with current Cython and NumPy
(the original ``pydensecrf`` 1.0rc3 does not). Without it, asking for a CRF is one
ConfigError that names the install command and the key that asked.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from furnace.config import ConfigError

INSTALL = "pip install pydensecrf2"


def require_densecrf(key: str = "eval_crf"):
    """The ``pydensecrf.densecrf`` module, or ConfigError naming ``key`` (the config key that
    asked for a CRF) and the install command."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise ConfigError(f"config key '{key}' asks for DenseCRF, which needs the optional "
                          f"package pydensecrf: {INSTALL} (it builds from source: a C++ "
                          f"compiler is needed), or --set {key}=false") from None
    return dcrf


def crf_image(normalized: np.ndarray, mean: Sequence[float], std: Sequence[float]
              ) -> np.ndarray:
    """The image the CRF's bilateral term sees: the network input de-normalised, as LPL does.

    normalized: float32 [3, H, W] (RGB, normalised with ``mean``/``std`` on the 0-1 scale).
    Returns uint8 [H, W, 3]: ``(x * std + mean) * 255`` in float32, clipped to [0, 255] and
    cast, which truncates (about 1 value in 6 comes back one below the original pixel).
    """
    x = np.asarray(normalized, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"crf_image expects a normalised [3, H, W] image, got {x.shape}")
    out = np.empty_like(x)
    for c in range(3):   # float32 arithmetic with Python scalars, as the reference
        out[c] = (x[c] * np.float32(std[c]) + np.float32(mean[c])) * np.float32(255)
    np.clip(out, 0, 255, out=out)
    return np.ascontiguousarray(out.astype(np.uint8).transpose(1, 2, 0))


def dense_crf(image: np.ndarray, prob: np.ndarray, iters: int = 1,
              gaussian: Tuple[float, float] = (3, 3),
              bilateral: Tuple[float, float, float] = (32, 13, 10), clip: float = 1e-5,
              key: str = "eval_crf") -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl and Koltun) mean-field inference.

    image: uint8 [H, W, 3] RGB (the bilateral term's colours).
    prob: float32 [C, H, W] class probabilities (each pixel sums to 1).
    iters: mean-field iterations (LPL: 1).
    gaussian: (sxy in px, compat) of the smoothness kernel.
    bilateral: (sxy in px, srgb in colour levels, compat) of the appearance kernel.
    clip: the unary is -ln(max(p, clip)).
    key: the config key named when pydensecrf is missing.
    Returns Q, float32 [C, H, W] (the CRF's marginals; argmax over C is the label).
    """
    dcrf = require_densecrf(key)
    from pydensecrf.utils import unary_from_softmax
    image = np.asarray(image)
    prob = np.asarray(prob, dtype=np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be uint8 [H, W, 3], got {image.dtype} "
                         f"{image.shape}")
    if prob.ndim != 3 or prob.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf: prob must be [C, H, W] with H, W of the image "
                         f"{image.shape[:2]}, got {prob.shape}")
    c, h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob, clip=clip)))
    d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1],
                           rgbim=np.ascontiguousarray(image), compat=bilateral[2])
    q = d.inference(int(iters))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)
