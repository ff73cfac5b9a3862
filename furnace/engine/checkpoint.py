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

import contextlib
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Optional

import numpy as np
import torch

logger = logging.getLogger("furnace.engine")

CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this model; the message says why and how to fix it."""


# ----------------------------------------------------------------------------- writing

TMP_RE = re.compile(r"^\.(.+\.pth)\.tmp(\d+)$")


def _tmp_path(path: Path) -> Path:
    """The temporary file of a save in progress: ``.<name>.tmp<pid>`` (see
    :func:`remove_stale_temporaries`)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_failed(path: Path, e: BaseException) -> CheckpointError:
    # torch.save reports a failed write as a RuntimeError from its zip writer (chained to
    # the OSError, when there is one): name the cause in one line either way
    cause = e
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OSError):
        why = cause.strerror or str(cause)
    else:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "write" in why.lower():
            why += " (disk full or file size limit?)"
    return CheckpointError(
        f"cannot write checkpoint {path}: {why}; the previous checkpoint there (if any) is "
        f"intact. Free space or fix permissions in {path.parent}, then resume with -c last")


@contextlib.contextmanager
def _atomic_file(path: Path):
    """A temporary file beside ``path`` (yielded) that replaces ``path`` by an atomic rename
    when the block ends. A failed write (full disk, file size limit, permissions) removes the
    temporary and raises :class:`CheckpointError` naming ``path``."""
    tmp = _tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise _write_failed(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def atomic_save(obj: Any, path: os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A process killed mid-write leaves the previous file untouched (rename is atomic); a failed
    write is one :class:`CheckpointError` and leaves no temporary.
    """
    with _atomic_file(Path(path)) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(src: os.PathLike, dst: os.PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and an atomic rename."""
    with _atomic_file(Path(dst)) as tmp:
        shutil.copyfile(src, tmp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a live process of another user
        return True
    return True


def remove_stale_temporaries(folder: os.PathLike) -> List[str]:
    """Delete the ``.<name>.pth.tmp<pid>`` files of saves whose process is gone (SIGKILL or a
    crash mid-write; each can be as large as a checkpoint). A temporary of a live process is
    left alone: it may be a save in progress. Returns the names removed."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed, size = [], 0
    for name in sorted(names):
        m = TMP_RE.match(name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        try:
            size += (folder / name).stat().st_size
            (folder / name).unlink()
            removed.append(name)
        except OSError:
            pass
    if removed:
        logger.warning("removed %d stale temporary file(s) of interrupted saves in %s "
                       "(%.1f MB): %s", len(removed), folder, size / 1e6, ", ".join(removed))
    return removed


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


# Epoch files each process wrote, per snapshot folder, for callers that keep no record of
# their own (save_checkpoint's ``owned``)
_WRITTEN: Dict[str, Dict[str, List[int]]] = {}


def _signature(path: Path) -> List[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def save_checkpoint(snapshot_dir: os.PathLike, epoch: int, state: Dict[str, Any],
                    keep: Optional[int] = None,
                    owned: Optional[MutableMapping[str, List[int]]] = None) -> Path:
    """Write ``epoch-<epoch>.pth`` and refresh ``epoch-last.pth`` (a copy, as the reference).

    ``keep``: if set, delete the oldest epoch files *this run wrote* so that at most ``keep``
    of them remain; files of another run in the same folder are never touched. ``owned``:
    the run's record, file name -> [size, mtime_ns] as written (updated here; a file changed
    since is not ours any more and is kept). Default: the files this process wrote.
    Returns the path of the epoch file.
    """
    snapshot_dir = Path(snapshot_dir)
    if owned is None:
        owned = _WRITTEN.setdefault(str(snapshot_dir.resolve()), {})
    path = snapshot_dir / f"epoch-{epoch}.pth"
    atomic_save(state, path)
    owned[path.name] = _signature(path)
    atomic_copy(path, snapshot_dir / LAST)
    if keep is not None and keep > 0:
        mine = sorted((int(m.group(1)), name) for name in list(owned)
                      for m in [CHECKPOINT_RE.match(name)] if m)
        for _, name in mine[:-keep]:
            old = snapshot_dir / name
            try:
                if _signature(old) == list(owned[name]):
                    old.unlink()
            except OSError:  # gone already, or unreadable: nothing of ours to delete
                pass
            del owned[name]
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


def checkpoint_method(ckpt: Mapping[str, Any], path: Optional[os.PathLike] = None) -> str:
    """The method that wrote ``ckpt`` (format 1, the reference's and ours before: DUEB).
    With ``path``: a method this installation does not know is a CheckpointError naming the
    file (it is the file's field, not a config key)."""
    from ..methods.presets import FORMAT1_METHOD
    name = str(ckpt.get("method", FORMAT1_METHOD)) if isinstance(ckpt, Mapping) \
        else FORMAT1_METHOD
    if path is not None:
        from ..methods.registry import method_names
        if name not in method_names():
            raise CheckpointError(
                f"checkpoint {path} was written by method {name!r}, which is not a registered "
                f"method here (known: {', '.join(method_names())}); use the framework version "
                "that wrote it, or another checkpoint")
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_resume_fields(ckpt: Any, path: os.PathLike, nepochs: int,
                        max_iter: Optional[int] = None) -> None:
    """Refuse a checkpoint whose position or bookkeeping fields are not what this framework
    writes (a crafted or foreign file): a negative or non-integer ``resume_at`` would train
    epochs that do not exist, with a learning rate extrapolated beyond the schedule."""
    def bad(field: str, want: str) -> CheckpointError:
        value = ckpt.get(field) if isinstance(ckpt, Mapping) else None
        return CheckpointError(f"-c {path}: field '{field}' is {value!r}, expected {want}; the "
                               "file was not written by this framework's training (or was "
                               "edited): resume from another checkpoint")

    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"-c {path}: the file holds a {type(ckpt).__name__}, not a "
                              "training checkpoint (a dict); resume from an epoch-N.pth or "
                              "epoch-last.pth of a run")
    if "method" in ckpt and (not isinstance(ckpt["method"], str) or not ckpt["method"]):
        raise bad("method", "a method name")
    for field in ("epoch", "iteration", "global_iteration"):
        if field in ckpt and not (_is_int(ckpt[field]) and ckpt[field] >= 0):
            raise bad(field, "an integer >= 0")
    if "resume_at" in ckpt:
        r = ckpt["resume_at"]
        if (not isinstance(r, (list, tuple)) or len(r) != 2 or not all(map(_is_int, r))
                or r[0] < 0 or r[1] < 0 or r[0] > nepochs):
            raise bad("resume_at", f"[epoch, iteration] with 0 <= epoch <= nepochs={nepochs} "
                                   "and iteration >= 0")
        if max_iter is not None and r[1] > max_iter:
            raise bad("resume_at", f"an iteration <= {max_iter} (iterations per epoch of this "
                                   "config; set niters_per_epoch as in that run)")
    elif "epoch" not in ckpt:
        raise bad("epoch", "the last completed epoch (the file holds no position)")
    if ckpt.get("best_miou") is not None:
        v = ckpt["best_miou"]
        # a method with several eval models keeps one best per name
        values = list(v.values()) if isinstance(v, Mapping) and all(
            isinstance(k, str) for k in v) else [v]
        if not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)
                                 and 0 <= x <= 1) for x in values):
            raise bad("best_miou", "none, a number in [0, 1], or a dict of such numbers by "
                                   "eval model name")
    for field in ("extra", "rng", "config", "snapshot_files"):
        if ckpt.get(field) is not None and not isinstance(ckpt[field], Mapping):
            raise bad(field, "a dict")


def restore_training(method, ckpt: Mapping[str, Any], path: os.PathLike, scaler=None,
                     niters: Optional[int] = None, nepochs: Optional[int] = None,
                     niters_full: Optional[int] = None):
    """Load modules, optimisers, method state and scaler of ``ckpt`` into ``method``.

    Returns ``(epoch, iteration)`` to continue from. Raises :class:`CheckpointError` when the
    file is another method's, holds no training state (a model-only file) or fields that do
    not fit (:func:`check_resume_fields`, with ``nepochs`` of the config)."""
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
    check_resume_fields(ckpt, path, nepochs if nepochs is not None else 10 ** 9, niters_full)
    for key, module in method.modules.items():
        load_model_weights(module, path, {"model": ckpt[key]})
    for key, opt in method.optimizers.items():
        try:
            opt.load_state_dict(ckpt[key])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"-c {path}: '{key}' does not fit this configuration's "
                                  f"optimiser ({e}); check learn_variance and the method") from e
    try:
        method.load_extra_state(ckpt.get("extra") or {})
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"-c {path}: the method state ('extra') does not fit this "
                              f"configuration ({msg}); check the method's options") from None
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
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:
        return contextlib.nullcontext()
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.float64, np.int64)]
    return safe([_reconstruct, np.ndarray, np.dtype, *dtypes])


# torch.save writes a zip archive; older torch and the reference wrote a pickle (protocol 2+)
_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_magic(path: Path) -> None:
    """A file that is neither makes torch fail with a parser error (``KeyError: 101``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if head.startswith(_MAGIC):
        return
    if not head:
        what = "is empty"
    else:
        try:
            text = head.decode("utf-8")
            what = f"is a text file (it starts with {text.splitlines()[0][:30]!r})" \
                if text.strip() else "holds only blanks"
        except UnicodeDecodeError:
            what = "is not a PyTorch file"
    raise CheckpointError(f"checkpoint {path} {what}, not a checkpoint written by torch.save; "
                          "give an epoch-N.pth / epoch-last.pth file")


def load_file(path: os.PathLike, trust_pickle: bool = False) -> Dict[str, Any]:
    """``torch.load`` on CPU with ``weights_only=True`` (loading cannot run code); errors name
    the file. ``trust_pickle``: full unpickling, for legacy files you trust only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_magic(path)
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
