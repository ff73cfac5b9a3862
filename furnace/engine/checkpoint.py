"""Checkpoints: atomic writes, safe reads (``weights_only=True``) with clear errors.

Format 2 (a dict): ``format`` (2), ``method`` (its registry name), one entry per module and
optimiser of the method under the method's keys (DUEB: ``model`` with ``branch1.*`` /
``branch2.*``, ``optimizer_1``, ``optimizer_2``, the reference's keys, so reference
checkpoints load here and ours there), ``epoch`` and ``iteration`` (the last completed ones),
``global_iteration``, ``resume_at`` ([epoch, iteration] to continue from, mid-epoch for a
preemption or ``snapshot_every_iters`` snapshot), ``extra`` (the method's own state),
``best_miou``, ``config`` (plain dicts), ``rng`` (tensors and numbers only), ``scaler`` and
``version``. Format 1 (no ``format`` key: the reference's and ours before) is read as DUEB,
resuming at the start of the next epoch.

Every file loads with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so loading never runs code. Legacy pickles that need more (our format-1
files stored NumPy RNG arrays) load only with ``trust_pickle=True`` (``--trust-pickle``).
"""
from __future__ import annotations

import logging
import os
import pickle
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

    A process killed mid-write leaves the previous file untouched (rename is atomic). A failed
    write (full disk, permissions) raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint "
            f"there (if any) is intact. Free space or fix permissions in {path.parent}") from e
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass


def atomic_copy(src: os.PathLike, dst: os.PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and an atomic rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoint {dst}: {e.strerror or e}; the previous checkpoint there "
            f"(if any) is intact. Free space or fix permissions in {dst.parent}") from e
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch CPU and CUDA generator states, as tensors, numbers and lists
    (types ``weights_only`` loading accepts)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "gauss": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state` (also the format-1 layout with a NumPy state tuple)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    if isinstance(npst, Mapping):
        npst = ("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"],
                npst["has_gauss"], npst["gauss"])
    np.random.set_state(npst)
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
    atomic_copy(path, snapshot_dir / LAST)
    if keep is not None and keep > 0:
        epochs = sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.match, os.listdir(snapshot_dir))
                        if m)
        for old in epochs[:-keep]:
            (snapshot_dir / f"epoch-{old}.pth").unlink(missing_ok=True)
    return path


LAST = "epoch-last.pth"
BEST = "best.pth"
FORMAT = 2


def save_snapshot(snapshot_dir: os.PathLike, state: Dict[str, Any]) -> Path:
    """Write a resumable mid-epoch ``state`` as ``epoch-last.pth`` (atomically; epoch files
    stay those of finished epochs). Returns the path."""
    path = Path(snapshot_dir) / LAST
    atomic_save(state, path)
    return path


def save_best(snapshot_dir: os.PathLike, state: Dict[str, Any], name: str = "") -> Path:
    """Write ``best.pth`` (the checkpoint with the best validation mIoU so far), or
    ``best-<name>.pth`` for one of a method's several eval models."""
    path = Path(snapshot_dir) / (f"best-{name}.pth" if name else BEST)
    atomic_save(state, path)
    return path


def training_state(method, *, epoch: int, iteration: int, global_iteration: int,
                   resume_at, config: Dict[str, Any], scaler=None,
                   best_miou: Any = None, version: str = "") -> Dict[str, Any]:
    """A format-2 checkpoint of ``method`` (see the module docstring)."""
    state: Dict[str, Any] = {"format": FORMAT, "method": method.name}
    for key, module in method.modules.items():
        state[key] = module.state_dict()
    for key, opt in method.optimizers.items():
        state[key] = opt.state_dict()
    state.update(epoch=int(epoch), iteration=int(iteration),
                 global_iteration=int(global_iteration), resume_at=[int(x) for x in resume_at],
                 extra=method.extra_state(), best_miou=best_miou, config=config,
                 rng=rng_state(), version=version,
                 scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled()
                 else None)
    return state


def checkpoint_method(ckpt: Mapping[str, Any]) -> str:
    """The method that wrote ``ckpt`` (format 1, the reference's and ours before: DUEB)."""
    from ..methods.presets import FORMAT1_METHOD
    return str(ckpt.get("method", FORMAT1_METHOD)) if isinstance(ckpt, Mapping) \
        else FORMAT1_METHOD


def restore_training(method, ckpt: Mapping[str, Any], path: os.PathLike, scaler=None,
                     niters: Optional[int] = None):
    """Load modules, optimisers, method state and scaler of ``ckpt`` into ``method``.

    Returns ``(epoch, iteration)`` to continue from. Raises :class:`CheckpointError` when the
    file is another method's or holds no training state (a model-only file)."""
    name = checkpoint_method(ckpt)
    if isinstance(ckpt, Mapping) and "method" in ckpt and name != method.name:
        raise CheckpointError(f"-c {path}: the checkpoint was written by method '{name}' but "
                              f"the config trains '{method.name}'; set method={name} or "
                              "start without -c")
    missing = [k for k in list(method.modules) + list(method.optimizers)
               if not isinstance(ckpt, Mapping) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"-c {path}: the file holds no '{missing[0]}', so it is not a training checkpoint "
            f"(model weights only?); -c resumes a run from its epoch-N.pth or epoch-last.pth. "
            "To start from weights, set pretrained_model (backbone) or train without -c")
    for key, module in method.modules.items():
        load_model_weights(module, path, {"model": ckpt[key]})
    for key, opt in method.optimizers.items():
        try:
            opt.load_state_dict(ckpt[key])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"-c {path}: '{key}' does not fit this configuration's "
                                  f"optimiser ({e}); check learn_variance and the method") from e
    method.load_extra_state(ckpt.get("extra") or {})
    if scaler is not None and ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    if "resume_at" in ckpt:
        epoch, idx = (int(x) for x in ckpt["resume_at"])
        if niters is not None and idx >= niters:
            epoch, idx = epoch + 1, 0
        return epoch, idx
    return int(ckpt["epoch"]) + 1, 0


# ----------------------------------------------------------------------------- reading

def _numpy_arrays_allowed():
    """Allow plain NumPy arrays in safe loading (format-1 files store the NumPy RNG state as
    one); they are data, rebuilt without running code. A no-op before torch 2.5."""
    import contextlib
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:
        return contextlib.nullcontext()
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.float64, np.int64)]
    return safe([_reconstruct, np.ndarray, np.dtype, *dtypes])


def load_file(path: os.PathLike, trust_pickle: bool = False) -> Dict[str, Any]:
    """``torch.load`` on CPU with ``weights_only=True`` (loading cannot run code); errors name
    the file. ``trust_pickle``: full unpickling, for legacy files you trust only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with _numpy_arrays_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle and "weights_only" in str(e):
            what = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise CheckpointError(
                f"checkpoint {path} stores Python objects that safe loading refuses"
                + (f" ({what.group(1)})" if what else "") + "; if you made this file or trust "
                "its source, rerun with --trust-pickle (loading it may run code)") from e
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. "
                              "The file may be truncated; use another epoch.") from e
    except Exception as e:  # truncated or foreign file
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {msg}. "
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
    # the network's own key map (``describe_state`` beside its definition) names what a
    # checkpoint of its family was trained with
    describe = getattr(type(model), "describe_state", None)
    have, want = (describe(state), describe(target)) if describe else ({}, {})
    for what in ("backbone", "num_classes"):
        if have.get(what) is not None and want.get(what) is not None \
                and have[what] != want[what]:
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
