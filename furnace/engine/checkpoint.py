"""Checkpoints: atomic writes in the reference format, tolerant reads with clear errors.

Format (a dict, compatible with the reference code): ``model`` (the dual-branch state dict,
keys ``branch1.*`` / ``branch2.*``), ``optimizer_1``, ``optimizer_2``, ``epoch``,
``iteration``; we add ``config``, ``rng``, ``scaler`` and ``version``.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

logger = logging.getLogger("furnace.engine")

CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this model; the message says why and how to fix it."""


# ----------------------------------------------------------------------------- writing

def atomic_save(obj: Any, path: os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A process killed mid-write leaves the previous file untouched (rename is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_copy(src: os.PathLike, dst: os.PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and an atomic rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch CPU and CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(snapshot_dir: os.PathLike, epoch: int, state: Dict[str, Any],
                    keep: Optional[int] = None) -> Path:
    """Write ``epoch-<epoch>.pth`` and refresh ``epoch-last.pth`` (a copy, as the reference).

    ``keep``: if set, delete the oldest ``epoch-N.pth`` files so that at most ``keep`` remain.
    Returns the path of the epoch file.
    """
    snapshot_dir = Path(snapshot_dir)
    path = snapshot_dir / f"epoch-{epoch}.pth"
    atomic_save(state, path)
    atomic_copy(path, snapshot_dir / "epoch-last.pth")
    if keep is not None and keep > 0:
        epochs = sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.match, os.listdir(snapshot_dir))
                        if m)
        for old in epochs[:-keep]:
            (snapshot_dir / f"epoch-{old}.pth").unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- reading

def load_file(path: os.PathLike) -> Dict[str, Any]:
    """``torch.load`` on CPU with an error that names the file when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Our checkpoints hold RNG states and the config, so full unpickling is needed;
        # only load checkpoints you trust.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. "
                              "The file may be truncated; use another epoch.") from e


def model_state(ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model state dict of a checkpoint: unwraps ``model`` and strips ``module.`` prefixes."""
    state = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(state, Mapping):
        raise CheckpointError("checkpoint holds no state dict (expected a dict or a 'model' key)")
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key.replace(".module.", ".")] = value
    return out


def describe_state(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Infer backbone name and class count from a dual-branch state dict (None if unknown)."""
    cls = state.get("branch1.classifier.weight")
    num_classes = int(cls.shape[0]) if cls is not None else None
    blocks = {int(m.group(1)) for k in state
              for m in [re.match(r"branch1\.backbone\.layer3\.(\d+)\.", k)] if m}
    bottleneck = "branch1.backbone.layer1.0.conv3.weight" in state
    n = len(blocks)
    names = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50",
             (23, True): "resnet101"}
    return {"num_classes": num_classes, "backbone": names.get((n, bottleneck))}


def load_model_weights(model: torch.nn.Module, path: os.PathLike,
                       ckpt: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Load the ``model`` weights of a checkpoint (ours or the reference's) into ``model``.

    Accepts a bare state dict or one under ``model``, with or without ``module.`` prefixes.
    A checkpoint of another backbone or class count raises :class:`CheckpointError` naming both.
    Returns the loaded checkpoint dict.
    """
    if ckpt is None:
        ckpt = load_file(path)
    state = model_state(ckpt)
    target = model.state_dict()
    have, want = describe_state(state), describe_state(target)
    for what in ("backbone", "num_classes"):
        if have[what] is not None and want[what] is not None and have[what] != want[what]:
            raise CheckpointError(
                f"checkpoint {path} was trained with {what}={have[what]} but the config has "
                f"{what}={want[what]}; set `{what}` in config.py (or --set {what}=...) to match "
                "the checkpoint, or evaluate a checkpoint of this experiment")
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    bad_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches (first: {'; '.join(bad_shape[:3])})")
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + ", ".join(parts)
                              + ". Check backbone, num_classes and output heads in the config.")
    model.load_state_dict(state, strict=True)
    return ckpt
