"""The training engine: one loop for every method of :mod:`furnace.methods`.

Per iteration: draw the batches of the streams the method declares, let the method compute
its loss terms (it calls ``backward`` on them), check every term for NaN/inf, set the poly LR,
average gradients across ranks, step every optimiser of the method, call its after-step hook,
log. Around it: checkpoints (per the reference schedule, every ``snapshot_every_iters`` inside
an epoch, and on SIGTERM/SIGINT/SIGUSR1), validation every ``eval_every`` epochs with
``best.pth``, and the reason the run stopped, in the train log. The engine knows no method by
name: the ``method`` config key picks one from the registry.
"""
from __future__ import annotations

import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import __version__
from ..config import Config
from ..data import TrainLoaders, build_eval_dataset, per_process_batch
from ..data.demo import prepare_from_config
from ..methods import Method, MethodContext, get_method, method_name
from ..methods.groups import reference_groups
from ..precision import amp_dtype
from . import checkpoint as ckpt_io
from .dist import (DistInfo, average_gradients, broadcast_module, max_rank_divergence,
                   reduce_mean)
from .lr import set_lr
from .runlock import run_guard
from .streams import epoch_batches
from .syncbn import convert_sync_batchnorm
from .trainlog import TrainLog

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

logger = logging.getLogger("furnace.engine")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stops before the optimiser step."""


class TrainingInterrupted(Exception):
    """A preemption signal stopped the run after saving a resumable checkpoint."""

    def __init__(self, signame: str, signum: int, path: Optional[Path], where: str):
        self.signame, self.signum, self.path = signame, signum, path
        saved = f"saved {path}" if path else "no checkpoint written (not rank 0)"
        super().__init__(f"interrupted by {signame} {where}; {saved}; resume with -c last")


def grad_scaler(device: torch.device, enabled: bool):
    """The AMP loss scaler (used with fp16 only); ``torch.amp.GradScaler`` takes the device
    from torch 2.3 on, older releases have the CUDA one only."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


def should_save(C: Config, epoch: int) -> bool:
    """The reference schedule: after epoch e if e > nepochs//6 and e % snapshot_iter == 0,
    and always after the last epoch (``snapshot_from`` replaces nepochs//6 when set)."""
    return (epoch > C.snapshot_from and epoch % C.snapshot_iter == 0) or epoch == C.nepochs - 1


def format_line(epoch: int, nepochs: int, idx: int, niters: int, lr: float,
                values: Dict[str, float], body: Optional[str] = None) -> str:
    """The per-iteration log line: ``Epoch e/E Iter i/N: lr=...`` then ``body`` (the
    method's :meth:`~furnace.methods.Method.log_line`; default: every term as name=value)."""
    if body is None:
        ordered = (["loss"] if "loss" in values else []) + [k for k in values if k != "loss"]
        body = " ".join(f"{k}={values[k]:.2f}" for k in ordered)
    return f"Epoch {epoch + 1}/{nepochs} Iter {idx + 1}/{niters}: lr={lr:.4e} {body}"


# The progress bar's loss fields: (log name, short label), those present.
BAR_FIELDS = (("loss", "loss"), ("loss_sup", "sup"), ("loss_unsup", "unsup"),
              ("loss_all", "al"), ("loss_all_unsup", "al_u"))
BAR_WIDTH = 100
BAR_FORMAT = "{n_fmt}/{total_fmt} {rate_fmt} ETA {remaining} {desc}"


def bar_text(epoch: int, nepochs: int, values: Dict[str, float]) -> str:
    """The few main losses shown after the bar's iteration/total, it/s and ETA (the full
    reference line goes to the log file only)."""
    shown = " ".join(f"{short}={values[n]:.3f}" for n, short in BAR_FIELDS if n in values)
    return f"epoch {epoch + 1}/{nepochs} {shown}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _to_device(batch: Dict, device: torch.device) -> Dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


class _StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (cluster preemption) request a checkpoint and a clean stop
    at the end of the current iteration; a second SIGINT stops at once (KeyboardInterrupt)."""

    NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}
        # the signals this platform has, in a fixed order (ranks exchange one flag each)
        self.signals = [getattr(signal, n) for n in self.NAMES if hasattr(signal, n)]

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


def train(C: Config, info: DistInfo, resume: Optional[str] = None, *,
          trust_pickle: bool = False) -> Path:
    """Train the configured method (``C.method``); returns the snapshot folder.

    ``resume``: a checkpoint path; modules, optimisers, method state, scaler, position (epoch
    and iteration) and RNG states are restored so that the run continues as if never stopped.
    ``trust_pickle``: load a legacy checkpoint with full unpickling (runs code it contains).
    Raises :class:`TrainingInterrupted` after a preemption signal (checkpoint written).
    """
    device = info.device
    if C.batch_size % info.world_size:
        raise ValueError(f"config batch_size={C.batch_size} is not divisible by the "
                         f"{info.world_size} processes; choose a multiple")
    batch = per_process_batch(C.batch_size, info.world_size)

    seed_everything(C.seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if C.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        with run_guard(C, info.is_main):  # output folders writable, one run per snapshot folder
            return _train(C, info, resume, device, batch, trust_pickle)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _prepare(module: torch.nn.Module, info: DistInfo, device: torch.device,
             sync_batchnorm: bool = True) -> torch.nn.Module:
    """SyncBN under DDP (when the method wants it), onto the device, rank 0's initial weights
    everywhere."""
    if info.distributed and sync_batchnorm:
        module = convert_sync_batchnorm(module, device)
    module.to(device)
    broadcast_module(module, info)
    return module


@dataclass
class Run:
    """What one training run holds between its parts (set-up fills it; the epochs read it)."""
    C: Config
    info: DistInfo
    method: Method
    loaders: TrainLoaders
    scaler: Any
    schedules: Dict[str, Any]
    params: List[torch.nn.Parameter]
    log: "TrainLog"
    niters: int                        # iterations run per epoch (debug may shorten it)
    niters_full: int                   # the schedule's iterations per epoch
    start_epoch: int = 0
    start_idx: int = 0
    resumed: bool = False
    best: Any = None                   # best validation mIoU so far (a fraction; by name for
    #                                    a method with several eval models)
    snapshot_dir: Path = Path(".")
    # the run's id and the epoch files it wrote (file name -> [size, mtime_ns]): snapshot_keep
    # prunes only those, never another run's files in a reused folder; both ride in the
    # checkpoints, so a resumed run goes on with its own record
    run_id: str = ""
    owned: Dict[str, list] = field(default_factory=dict)

    def state(self, epoch: int, idx: int, best: Optional[float] = None) -> Dict[str, Any]:
        """The checkpoint after iteration ``idx`` of ``epoch`` (format 2)."""
        nxt = [epoch, idx + 1] if idx + 1 < self.niters else [epoch + 1, 0]
        state = ckpt_io.training_state(
            self.method, epoch=epoch, iteration=idx,
            global_iteration=epoch * self.niters_full + idx, resume_at=nxt,
            config=self.C.to_dict(), scaler=self.scaler,
            best_miou=self.best if best is None else best, version=__version__)
        state.update(run_id=self.run_id,
                     snapshot_files={k: list(v) for k, v in self.owned.items()})
        return state


def _setup(C: Config, info: DistInfo, resume: Optional[str], device: torch.device,
           batch: int, trust_pickle: bool) -> Run:
    """The method, its optimisers' schedules, the resumed position, the loaders and the log."""
    cls = get_method(method_name(C))
    niters_full = C.niters_per_epoch
    niters = min(C.debug, niters_full) if C.debug else niters_full
    amp = amp_dtype(C.amp, device)
    groups = reference_groups(C.get("reference_gpus"), C.batch_size, info.world_size,
                              info.rank)
    ctx = MethodContext(device=device, batch_per_process=batch, amp=amp, rank=info.rank,
                        world_size=info.world_size, niters_per_epoch=niters_full,
                        groups=groups,
                        prepare=lambda m: _prepare(m, info, device, cls.sync_batchnorm))
    method = cls(C, ctx)
    scaler = grad_scaler(device, enabled=amp is torch.float16)
    # independent aleatoric noise and augmentation per rank
    seed_everything(C.seed + info.rank)

    start_epoch, start_idx, best = 0, 0, None
    snapshot_dir = Path(C.snapshot_dir)
    # the run's id and the epoch files it wrote (file name -> [size, mtime_ns]): snapshot_keep
    # prunes only those, never another run's files in a reused folder; both ride in the
    # checkpoints, so a resumed run goes on with its own record
    run_id, owned = uuid.uuid4().hex, {}
    if resume:
        ck = ckpt_io.load_file(resume, trust_pickle=trust_pickle)
        start_epoch, start_idx = ckpt_io.restore_training(
            method, ck, resume, scaler, niters, nepochs=C.nepochs, niters_full=niters_full)
        best = ck.get("best_miou")
        if isinstance(ck.get("run_id"), str):
            run_id = ck["run_id"]
            if Path(resume).resolve().parent == snapshot_dir.resolve():
                owned = _files_of_run(snapshot_dir, ck.get("snapshot_files") or {}, run_id)
            best = _best_of_run(snapshot_dir, run_id, best)
        if "rng" in ck:
            try:
                ckpt_io.set_rng_state(ck["rng"])
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
                raise ckpt_io.CheckpointError(
                    f"-c {resume}: field 'rng' is not a random generator state this framework "
                    f"writes ({type(e).__name__}); resume from another checkpoint") from None
        if info.rank > 0:  # only rank 0's states are saved
            seed_everything((C.seed + info.rank) * 1000 + start_epoch
                            + (start_idx * 100003 if start_idx else 0))
        logger.info("resumed from %s at epoch %d iteration %d", resume, start_epoch, start_idx)
        if start_epoch >= C.nepochs:
            raise ckpt_io.CheckpointError(
                f"-c {resume}: that run already finished its {C.nepochs} epochs; to train "
                f"further raise nepochs (--set nepochs={C.nepochs + 10}), or start a new run "
                "without -c")

    if info.is_main:
        prepare_from_config(C)
    if info.distributed:
        torch.distributed.barrier()
    loaders = TrainLoaders(C, rank=info.rank, world_size=info.world_size,
                           streams=cls.stream_specs())
    if int(C.get("eval_every") or 0) and info.is_main:
        # the val list is needed after the first epoch(s): check it now, not hours later
        build_eval_dataset(C)
    params, seen = [], set()
    for module in method.modules.values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    schedules = method.lr_schedules(C.nepochs * niters_full, niters_full * C.warm_up_epoch)
    if set(schedules) != set(method.optimizers):
        raise ValueError(f"{cls.__name__}.lr_schedules() must give one schedule per optimiser "
                         f"{sorted(method.optimizers)}, got {sorted(schedules)}")
    log = TrainLog(C, info.is_main)
    log.line(f"# furnace {__version__}: method={cls.name} {method.describe()} "
             f"world_size={info.world_size} reference_groups={groups.per_process}/process "
             f"of {groups.total} device={device} amp={C.amp} config={C.to_dict()}")
    if resume:
        log.line(f"# resumed from {resume} at epoch {start_epoch} iteration {start_idx}")
    return Run(C, info, method, loaders, scaler, schedules, params, log, niters, niters_full,
               start_epoch, start_idx, bool(resume), best, snapshot_dir, run_id, owned)


def _train(C: Config, info: DistInfo, resume: Optional[str], device: torch.device,
           batch: int, trust_pickle: bool) -> Path:
    """Set up, then the epochs (as torchvision's ``main`` around ``train_one_epoch``), then
    the end-of-run guard; the reason the run stopped ends the train log."""
    run = _setup(C, info, resume, device, batch, trust_pickle)
    reason = "error"
    try:
        with _StopSignals() as stop:
            for epoch in range(run.start_epoch, C.nepochs):
                run.method.train_mode()
                run.method.on_epoch_start(epoch, resumed=run.resumed
                                          and epoch == run.start_epoch)
                first = run.start_idx if epoch == run.start_epoch else 0
                train_one_epoch(run, epoch, first, stop)
                end_of_epoch(run, epoch)
                if C.stop_after_epoch is not None and epoch >= C.stop_after_epoch:
                    break
            if info.distributed:
                # a cheap end-of-run guard that gradient averaging kept the replicas identical
                diff = max(max_rank_divergence(m, info) for m in run.method.modules.values())
                run.log.line(f"# max parameter difference across {info.world_size} ranks: "
                             f"{diff:.3e}")
        reason = "finished"
    except TrainingInterrupted as e:
        reason = f"interrupted ({e.signame})"
        raise
    except NonFiniteLossError:
        reason = "NaN"
        raise
    except KeyboardInterrupt:
        reason = "interrupted (second SIGINT, not saved)"
        raise
    except BaseException as e:
        reason = f"error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise
    finally:
        run.log.line(f"# stopped: {reason}")
        run.log.close()
    return run.snapshot_dir


def _files_of_run(snapshot_dir: Path, files: Dict[str, Any], run_id: str) -> Dict[str, list]:
    """The epoch files a resumed run wrote, from its checkpoint's record: name ->
    [size, mtime_ns] as written, or None for the file that was being written with it, which
    counts when it holds this run's id (read through mmap: no weights are loaded)."""
    owned = {}
    for name, sig in files.items():
        name = str(name)
        if not ckpt_io.CHECKPOINT_RE.match(name):
            continue
        if isinstance(sig, (list, tuple)) and len(sig) == 2:
            owned[name] = [int(x) for x in sig]
            continue
        path = snapshot_dir / name
        try:
            other = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(other, dict) and other.get("run_id") == run_id:
                owned[name] = ckpt_io._signature(path)
        except Exception:  # gone, unreadable or not ours: never pruned
            pass
    return owned


def _best_of_file(path: Path, run_id: str) -> Any:
    """The ``best_miou`` a best checkpoint of run ``run_id`` recorded (None if it is not
    one: missing, unreadable, another run's)."""
    if not path.is_file():
        return None
    try:
        other = ckpt_io.load_file(path)
    except (ckpt_io.CheckpointError, OSError):
        return None
    if not isinstance(other, dict) or other.get("run_id") != run_id:
        return None
    return other.get("best_miou")


def _best_of_run(snapshot_dir: Path, run_id: str, best: Any) -> Any:
    """The best mIoU of run ``run_id``: the resumed checkpoint's, or that of the run's
    best checkpoint when higher (an epoch file is written before its validation). A float,
    or for a method with several eval models a dict by name (``best-<name>.pth`` each)."""
    if isinstance(best, dict) or list(snapshot_dir.glob("best-*.pth")):
        out = dict(best) if isinstance(best, dict) else {}
        for path in snapshot_dir.glob("best-*.pth"):
            v = _best_of_file(path, run_id)
            name = path.stem[len("best-"):]
            v = v.get(name) if isinstance(v, dict) else None
            if isinstance(v, float) and (out.get(name) is None or v > out[name]):
                out[name] = v
        return out or best
    v = _best_of_file(snapshot_dir / ckpt_io.BEST, run_id)
    if not isinstance(v, float):
        return best
    return v if best is None or v > best else best


def train_one_epoch(run: Run, epoch: int, first: int, stop: "_StopSignals") -> None:
    """Iterations ``first .. niters-1`` of ``epoch``: one :func:`train_step` each, its log
    line, a checkpoint and a clean stop on a preemption signal, and the periodic mid-epoch
    checkpoint (``snapshot_every_iters``)."""
    C, info = run.C, run.info
    batches = epoch_batches(run.loaders, epoch, range(len(run.loaders.loaders)), first,
                            run.niters)
    bar = range(first, run.niters)
    if tqdm is not None and info.is_main:
        # iteration/total, it/s and ETA first, then the losses; at most BAR_WIDTH
        bar = tqdm(bar, file=sys.stdout, ncols=BAR_WIDTH, leave=False, bar_format=BAR_FORMAT,
                   initial=first, total=run.niters)
    every = int(C.get("snapshot_every_iters") or 0)
    t0 = time.time()
    for idx in bar:
        data = [_to_device(b, info.device) for b in next(batches)]
        t_global = epoch * run.niters_full + idx
        values, lr, extras, got = train_step(run, data, epoch, idx, t_global, stop)
        if info.is_main:
            log_iteration(run, epoch, idx, t_global, lr, values, extras, bar)
        if got:
            signum = stop.signum if stop.signum is not None else got[0]
            name = signal.Signals(signum).name
            path = None
            if info.is_main:
                if hasattr(bar, "close"):
                    bar.close()
                path = ckpt_io.save_snapshot(run.snapshot_dir, run.state(epoch, idx))
                run.log.line(f"# saved {path}")
            raise TrainingInterrupted(name, signum, path, f"at epoch {epoch} iteration {idx}")
        if every and (t_global + 1) % every == 0 and idx + 1 < run.niters and info.is_main:
            path = ckpt_io.save_snapshot(run.snapshot_dir, run.state(epoch, idx))
            run.log.line(f"# saved {path} (epoch {epoch} iteration {idx})")
    if info.is_main:
        if hasattr(bar, "close"):
            bar.close()
        msg = (f"epoch {epoch + 1}/{C.nepochs} done in {time.time() - t0:.1f}s "
               f"({(time.time() - t0) / max(1, run.niters - first):.3f}s/iter)")
        run.log.line("# " + msg)
        print(msg, flush=True)


def train_step(run: Run, data: List[Dict], epoch: int, idx: int, t_global: int,
               stop: "_StopSignals"):
    """One iteration: the method's losses and backward, every optimiser's LR from its
    schedule, the loss terms (and the stop flags) averaged over ranks and checked for
    NaN/inf, gradients averaged, the optimiser steps and the method's after-step hook.
    Returns (values: rank-mean terms, lr: the first optimiser's LR, extras, signals seen)."""
    method, info, scaler = run.method, run.info, run.scaler
    for opt in method.optimizers.values():
        opt.zero_grad(set_to_none=method.zero_grad_set_to_none)
    # the method calls backward on its loss (or parts of it); the optimisers only step after
    # the finiteness check below
    loss, terms, extras = method.train_step(data, iteration=t_global, epoch=epoch,
                                            backward=lambda l: scaler.scale(l).backward())
    lrs = [run.schedules[k].get_lr(t_global) for k in method.optimizers]
    for opt, lr in zip(method.optimizers.values(), lrs):
        set_lr([opt], lr)
    names = list(terms)
    # the stop request rides along with the logged values: every rank sees it at the same
    # iteration, so all of them stop together
    flags = torch.tensor([float(stop.signum == s) for s in stop.signals], device=info.device)
    stacked = torch.cat([torch.stack([terms[n].detach().float() for n in names]), flags])
    reduced = reduce_mean(stacked, info).tolist()
    got = [s for s, f in zip(stop.signals, reduced[len(names):]) if f > 0]
    values = dict(zip(names, reduced[:len(names)]))
    bad = [n for n in names if not math.isfinite(values[n])]
    if bad:
        raise NonFiniteLossError(
            f"loss term '{bad[0]}' is {values[bad[0]]} at epoch {epoch} iteration {idx} "
            f"(global {t_global}); stopped before the optimiser step, the last checkpoint in "
            f"{run.snapshot_dir} is intact. Try a lower lr or amp=off.")
    average_gradients(run.params, info)
    for opt in method.optimizers.values():
        scaler.step(opt)
    scaler.update()
    method.after_step(iteration=t_global, epoch=epoch)
    return values, lrs[0], extras, got


def log_iteration(run: Run, epoch: int, idx: int, t_global: int, lr: float,
                  values: Dict[str, float], extras: Dict[str, torch.Tensor], bar) -> None:
    """Rank 0: the train-log line, the progress bar's losses, tensorboard scalars and, every
    ``tb_images_every`` iterations, images."""
    C = run.C
    run.log.line(format_line(epoch, C.nepochs, idx, run.niters, lr, values,
                             run.method.log_line(values)))
    if hasattr(bar, "set_description_str"):
        bar.set_description_str(bar_text(epoch, C.nepochs, values), refresh=False)
    run.log.scalars(dict(values, lr=lr), t_global)
    if C.tb_images_every and t_global % C.tb_images_every == 0:
        run.log.images(extras, C, t_global)


def end_of_epoch(run: Run, epoch: int) -> None:
    """The epoch's checkpoint on the reference schedule, then validation every
    ``eval_every`` epochs (and after the last): a validation that fails (or is killed) must
    not cost the epoch's training."""
    C = run.C
    if run.info.is_main and should_save(C, epoch):
        state = run.state(epoch, run.niters - 1)
        # the file being written, by name: its size is known only afterwards
        state["snapshot_files"][f"epoch-{epoch}.pth"] = None
        path = ckpt_io.save_checkpoint(run.snapshot_dir, epoch, state, C.snapshot_keep,
                                       run.owned)
        run.log.line(f"# saved {path}")
    eval_every = int(C.get("eval_every") or 0)
    if eval_every and ((epoch + 1) % eval_every == 0 or epoch == C.nepochs - 1):
        run.best = _validate(run, epoch)


def _validate(run: Run, epoch: int) -> Any:
    """Evaluate each of the method's eval models on the val list (rank 0), log its mIoU and
    keep its best checkpoint (``best.pth``; ``best-<name>.pth`` when there are several).
    Returns the best mIoU so far: a fraction, or a dict by name for several models."""
    C, info, log = run.C, run.info, run.log
    models = run.method.eval_models()
    if not models:          # the method skips this validation (e.g. its reference's cadence)
        return run.best
    several = len(models) > 1
    best = dict(run.best) if several and isinstance(run.best, dict) else \
        {} if several else {name: run.best for name in models}
    if info.is_main:
        from ..eval.loop import evaluate_model, validation_config
        for name, model in models.items():
            tag = f" {name}" if several else ""
            t0 = time.time()
            # validation must not move the training RNG streams (a run with eval_every then
            # trains exactly as one without)
            devices = [info.device] if info.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                m = evaluate_model(model, validation_config(C), str(info.device),
                                   uncertainty=bool(C.get("eval_uncertainty", False)))
            miou = float(m["miou"])
            step = (epoch + 1) * run.niters_full
            prefix = f"val/{name}" if several else "val"
            log.scalars({"miou": miou, "pixel_acc": float(m["pixel_acc"])}, step,
                        prefix=prefix)
            if "uncertainty" in m:
                u = m["uncertainty"]
                values = {"ece": float(u["ece"])}
                for score, v in u["scores"].items():
                    values.update({f"auroc_{score}": float(v["auroc"]),
                                   f"aupr_{score}": float(v["aupr"])})
                log.scalars(values, step, prefix=prefix.replace("val", "val_uncertainty"))
                for line in m["uncertainty_text"].splitlines():
                    log.line(f"# val epoch {epoch + 1}{tag} {line}")
                print(m["uncertainty_text"], flush=True)
            old = best.get(name)
            improved = old is None or miou > old
            log.line(f"# val epoch {epoch + 1}{tag}: mIoU {100 * miou:.3f}% pixel acc "
                     f"{100 * float(m['pixel_acc']):.3f}% ({time.time() - t0:.1f}s)"
                     + (" best" if improved else f" (best {100 * old:.3f}%)"))
            print(f"val epoch {epoch + 1}{tag}: mIoU {100 * miou:.2f}%", flush=True)
            if improved:
                best[name] = miou
                path = ckpt_io.save_best(run.snapshot_dir,
                                         run.state(epoch, run.niters - 1,
                                                   best if several else miou),
                                         name if several else "")
                log.line(f"# saved {path}")
    if info.distributed:
        # every rank keeps the same best values (for its checkpoints) and waits for rank 0
        t = torch.tensor([best.get(n) if best.get(n) is not None else -1.0 for n in models],
                         dtype=torch.float64, device=info.device)
        torch.distributed.broadcast(t, src=0)
        best = {n: (None if v < 0 else v) for n, v in zip(models, t.tolist())}
    if several:
        return {n: v for n, v in best.items() if v is not None}
    return next(iter(best.values()))
