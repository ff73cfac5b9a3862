"""Mixed precision in one place: the ``amp`` key's autocast dtype (training and evaluation
alike), the autocast context, and the upcast of half-precision outputs for the losses.

Every method trains in fp32 by default, as the references do; ``amp=bf16`` (or ``fp16``) is
the speed option, ``auto`` is bf16 on CUDA and fp32 elsewhere.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

AMP_MODES = ("off", "auto", "bf16", "fp16")


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` ``mode`` on ``device`` (None: full precision). An
    explicit ``bf16``/``fp16`` holds on every device; ``auto`` is bf16 on CUDA only."""
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {mode!r}")
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """``torch.autocast(device_type, dtype)``, or a no-op context for ``dtype`` None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (bf16/fp16 under autocast) to float32 for the losses; float32
    and float64 pass unchanged, so the losses run in the model's own precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
