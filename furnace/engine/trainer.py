"""The DUEB training step and loop.

One iteration follows the reference order exactly (REFERENCE 3.1): supervised passes of both
branches, four no-grad teacher passes in train mode (b1(u0), b1(u1), b2(u0), b2(u1)), CutMix of
the teacher logits, pseudo labels, two student passes on the mixed batch, then

    loss = S1 + S2 + lambda (U_inter + U_union)
         + 0.5 A(z1s) + 0.5 A(z2s) + A(z1u) + A(z2u)          (aleatoric switch)
         + 0.5 E(z1s) + 0.5 E(z2s) + E(z1u) + E(z2u)          (energy switch)

Both switches on is train.py, aleatoric only trainal.py, energy only traine.py, both off the
CPCL baseline; ``supervised_only`` trains on labelled data alone. Switched-off terms are not
computed at all.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..config import Config
from ..data import TrainLoaders
from ..data.demo import prepare_from_config
from ..losses import (AleatoricLoss, CITYSCAPES_CLASS_WEIGHTS, OhemCrossEntropy, energy_term,
                      pseudo_labels, unsup_ce)
from ..losses import noise as noise_fill
from ..models import network_from_config, param_groups
from . import checkpoint as ckpt_io
from .dist import (DistInfo, average_gradients, broadcast_module, max_rank_divergence,
                   reduce_mean)
from .lr import PolyLR, set_lr
from .syncbn import convert_sync_batchnorm

logger = logging.getLogger("furnace.engine")

IGNORE = 255


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stops before the optimiser step."""


# Log-line layout of REFERENCE 1.8, with balanced brackets.
UNSUP_FIELDS = ("inter", "union", "predlog_unsup1", "predlog_unsup2")
SUP_FIELDS = ("sup_1", "sup_2", "overlap", "predlog_sup1", "predlog_sup2")


def amp_dtype(C: Config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``C.amp`` on ``device`` (None: full precision)."""
    mode = C.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


class DUEBStep:
    """Computes the loss terms of one DUEB iteration.

    ``model`` is the dual-branch network; batches are dicts of device tensors:
    ``lab = {'data': [B,3,H,W] float, 'label': [B,H,W] int64}``,
    ``u0 = {'data': [B,3,H,W], 'mask': [B,1,H,W] in {0,1}}``, ``u1 = {'data': [B,3,H,W]}``.
    """

    def __init__(self, model: torch.nn.Module, C: Config, batch_per_process: int,
                 amp: Optional[torch.dtype] = None):
        self.model = model
        self.C = C
        self.amp = amp
        self.use_aleatoric = bool(C.aleatoric.enabled)
        self.use_energy = bool(C.energy.enabled)
        self.use_unsup = not C.supervised_only
        if C.sup_loss == "ohem":
            weight = CITYSCAPES_CLASS_WEIGHTS if C.ohem_class_weight else None
            if weight is not None and len(weight) != C.num_classes:
                raise ValueError(f"config ohem_class_weight=True uses the 19 Cityscapes class "
                                 f"weights but num_classes is {C.num_classes}; set "
                                 "ohem_class_weight=False")
            # min_kept scales with the batch each process sees (50000 x B in the reference)
            min_kept = C.ohem_min_kept * batch_per_process // C.batch_size
            self.sup_criterion = OhemCrossEntropy(IGNORE, C.ohem_thresh, min_kept, weight)
        else:
            self.sup_criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
        if self.use_aleatoric:
            self.aleatoric = AleatoricLoss(C.aleatoric.samples, IGNORE,
                                           learn_variance=C.aleatoric.learn_variance,
                                           per_pixel=C.aleatoric.per_pixel)

    def _autocast(self, device: torch.device):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp)

    def forward(self, step: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits [B,C,H,W] and var [B,1,H,W] of branch ``step``; losses run in float32."""
        with self._autocast(x.device):
            _, logits, var = self.model(x, step=step)
        return logits.float(), var.float()

    def _teachers(self, u0: torch.Tensor, u1: torch.Tensor, mask: torch.Tensor):
        """Mixed teacher logits of both branches (no grad, train mode as the reference)."""
        mixed = []
        with torch.no_grad():
            if self.C.fuse_passes:
                for k in (1, 2):
                    z, _ = self.forward(k, torch.cat([u0, u1]))
                    z0, z1 = z.chunk(2)
                    mixed.append(z0 * (1 - mask) + z1 * mask)
            else:
                z10, _ = self.forward(1, u0)
                z11, _ = self.forward(1, u1)
                z20, _ = self.forward(2, u0)
                z21, _ = self.forward(2, u1)
                mixed = [z10 * (1 - mask) + z11 * mask, z20 * (1 - mask) + z21 * mask]
        return mixed

    def __call__(self, lab: Dict[str, torch.Tensor], u0: Optional[Dict[str, torch.Tensor]] = None,
                 u1: Optional[Dict[str, torch.Tensor]] = None,
                 backward: Optional[Callable[[torch.Tensor], None]] = None,
                 iteration: Optional[int] = None):
        """Returns ``(loss, terms, extras)``: the total loss, a dict of its (weighted
        components') values as 0-d tensors, and tensors for visualisation.

        ``backward``: if given, it is called on each branch's share of the loss as soon as that
        share is complete: supervised branch 1, supervised branch 2, then (after the teachers)
        student branch 1 and student branch 2. Passes, BatchNorm updates and random draws keep
        the reference order and the gradients add up to those of the total loss, but only one
        branch's graph is alive at a time, which lowers peak memory. ``loss`` is then detached.

        ``iteration``: the global iteration (from 0); the aleatoric terms are left out before
        ``C.aleatoric.start_iter`` (None: always in).
        """
        C = self.C
        use_aleatoric = self.use_aleatoric and (
            iteration is None or iteration >= int(C.aleatoric.start_iter))
        imgs, gts = lab["data"], lab["label"]
        terms: Dict[str, torch.Tensor] = {}
        fused = C.fuse_passes and self.use_unsup
        stream = backward is not None and not fused
        parts = []

        def add(partial: torch.Tensor) -> None:
            if stream:
                backward(partial)
                partial = partial.detach()
            parts.append(partial)

        if self.use_unsup:
            mask = u0["mask"]
            mixed_in = u0["data"] * (1 - mask) + u1["data"] * mask
        if fused:
            t1, t2 = self._teachers(u0["data"], u1["data"], mask)
            outs = {}
            for k in (1, 2):
                z, v = self.forward(k, torch.cat([imgs, mixed_in]))
                outs[k] = (z.split(imgs.shape[0]), v.split(imgs.shape[0]))

        # supervised terms, one branch at a time
        al_sup, extras = [], {}
        for k in (1, 2):
            z, v = (outs[k][0][0], outs[k][1][0]) if fused else self.forward(k, imgs)
            if k == 1:
                extras = {"image": imgs, "label": gts, "logits": z.detach(), "var": v.detach()}
            part = terms[f"sup_{k}"] = self.sup_criterion(z, gts)
            if self.use_energy:
                terms[f"predlog_sup{k}"] = energy_term(F.softmax(z, dim=1), gts, IGNORE)
                part = part + C.energy.sup_weight * terms[f"predlog_sup{k}"]
            if use_aleatoric:
                al_sup.append(C.aleatoric.sup_weight * self.aleatoric(z, v, gts))
                part = part + al_sup[-1]
            add(part)
        if use_aleatoric:
            terms["loss_all"] = al_sup[0] + al_sup[1]

        if self.use_unsup:
            if not fused:
                t1, t2 = self._teachers(u0["data"], u1["data"], mask)
            pl = pseudo_labels(t1, t2, IGNORE)
            al_unsup = []
            # branch 1 learns the intersection labels, branch 2 the union labels
            for k, name, label, weight in ((1, "inter", pl.inter, pl.weight_inter),
                                           (2, "union", pl.union, pl.weight_union)):
                z, v = (outs[k][0][1], outs[k][1][1]) if fused else self.forward(k, mixed_in)
                terms[name] = unsup_ce(z, label, weight, IGNORE)
                part = C.unsup_weight * terms[name]
                if use_aleatoric:
                    al_unsup.append(C.aleatoric.unsup_weight * self.aleatoric(z, v, label))
                    part = part + al_unsup[-1]
                if self.use_energy:
                    terms[f"predlog_unsup{k}"] = energy_term(F.softmax(z, dim=1), label, IGNORE)
                    part = part + C.energy.unsup_weight * terms[f"predlog_unsup{k}"]
                add(part)
            terms["loss_unsup"] = C.unsup_weight * (terms["inter"] + terms["union"])
            if use_aleatoric:
                terms["loss_all_unsup"] = al_unsup[0] + al_unsup[1]
            terms["overlap"] = pl.overlap

        terms["loss_sup"] = (terms["sup_1"] + terms["sup_2"]).detach()
        loss = sum(parts[1:], parts[0])
        if backward is not None:
            if not stream:
                backward(loss)
            loss = loss.detach()
            terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = loss
        return loss, terms, extras


# ----------------------------------------------------------------------------- the loop

def make_optimizer(branch: torch.nn.Module, C: Config) -> torch.optim.SGD:
    groups = param_groups(branch, C.lr, C.weight_decay, learn_variance=C.aleatoric.learn_variance)
    return torch.optim.SGD(groups, lr=C.lr, momentum=C.momentum, weight_decay=C.weight_decay)


def should_save(C: Config, epoch: int) -> bool:
    """The reference schedule: after epoch e if e > nepochs//6 and e % snapshot_iter == 0,
    and always after the last epoch (``snapshot_from`` replaces nepochs//6 when set)."""
    return (epoch > C.snapshot_from and epoch % C.snapshot_iter == 0) or epoch == C.nepochs - 1


def format_line(epoch: int, nepochs: int, idx: int, niters: int, lr: float,
                values: Dict[str, float]) -> str:
    """The per-iteration log line (REFERENCE 1.8 fields, %.2f, balanced brackets)."""
    def fmt(names):
        return ", ".join(f"{n}={values[n]:.2f}" for n in names if n in values)

    parts = [f"Epoch {epoch + 1}/{nepochs} Iter {idx + 1}/{niters}: lr={lr:.4e}",
             f"loss={values['loss']:.2f}"]
    if "loss_unsup" in values:
        parts.append(f"[loss_unsup={values['loss_unsup']:.2f} ({fmt(UNSUP_FIELDS)})]")
    parts.append(f"[loss_sup={values['loss_sup']:.2f} ({fmt(SUP_FIELDS)})]")
    for n in ("loss_all", "loss_all_unsup"):
        if n in values:
            parts.append(f"{n}={values[n]:.2f}")
    return " ".join(parts)


# The progress bar's loss fields: (log name, short label), the first present of each group.
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


class _TrainLog:
    """Rank-0 logging: the train log file, tqdm description and tensorboardX events."""

    def __init__(self, C: Config, enabled: bool):
        self.file = None
        self.tb = None
        if not enabled:
            return
        Path(C.log_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(C.train_log_file, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(C.tb_dir)
        except ImportError:  # tensorboardX is optional at run time
            logger.warning("tensorboardX not installed: no tensorboard events")

    def line(self, text: str) -> None:
        if self.file:
            self.file.write(text + "\n")

    def scalars(self, values: Dict[str, float], lr: float, step: int) -> None:
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.add_scalar("train/lr", lr, step)

    def images(self, extras: Dict[str, torch.Tensor], C: Config, step: int) -> None:
        if not self.tb:
            return
        mean = torch.tensor(C.image_mean, device=extras["image"].device).view(3, 1, 1)
        std = torch.tensor(C.image_std, device=extras["image"].device).view(3, 1, 1)
        img = (extras["image"][0].float() * std + mean).clamp(0, 1)
        pred = extras["logits"][0].argmax(0).float() / max(1, C.num_classes - 1)
        var = extras["var"][0, 0].float()
        var = (var - var.min()) / (var.max() - var.min() + 1e-12)
        self.tb.add_image("train/input", img.cpu(), step)
        self.tb.add_image("train/prediction", pred[None].cpu(), step)
        self.tb.add_image("train/variance", var[None].cpu(), step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _noise_backend(step, device: torch.device) -> str:
    """Which normal generator the aleatoric noise uses (the stream differs between them)."""
    if not step.use_aleatoric:
        return "unused"
    return noise_fill.backend() if device.type == "cpu" else f"torch-{device.type}"


def train(C: Config, info: DistInfo, resume: Optional[str] = None) -> Path:
    """Train the dual-branch network as configured; returns the snapshot folder.

    ``resume``: a checkpoint path; model, both optimisers, scaler, epoch and RNG states are
    restored so that the run continues as if never stopped.
    """
    device = info.device
    if C.batch_size % info.world_size:
        raise ValueError(f"config batch_size={C.batch_size} is not divisible by the "
                         f"{info.world_size} processes; choose a multiple")
    batch = C.batch_size // info.world_size
    if batch < 2:
        raise ValueError(f"config batch_size={C.batch_size} gives {batch} image per process; "
                         "BatchNorm in the ASPP pooled branch needs at least 2 to train. "
                         "Increase batch_size (or use fewer processes).")

    seed_everything(C.seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if C.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        return _train(C, info, resume, device, batch)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(C: Config, info: DistInfo, resume: Optional[str], device: torch.device,
           batch: int) -> Path:

    model = network_from_config(C)
    if info.distributed:
        model = convert_sync_batchnorm(model, device)
    model.to(device)
    broadcast_module(model, info)
    opt1, opt2 = make_optimizer(model.branch1, C), make_optimizer(model.branch2, C)
    amp = amp_dtype(C, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    # independent aleatoric noise and augmentation per rank
    seed_everything(C.seed + info.rank)

    start_epoch = 0
    if resume:
        ck = ckpt_io.load_file(resume)
        ckpt_io.load_model_weights(model, resume, ck)
        opt1.load_state_dict(ck["optimizer_1"])
        opt2.load_state_dict(ck["optimizer_2"])
        if ck.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ck["scaler"])
        start_epoch = int(ck["epoch"]) + 1
        if "rng" in ck:
            ckpt_io.set_rng_state(ck["rng"])
        if info.rank > 0:  # only rank 0's states are saved
            seed_everything((C.seed + info.rank) * 1000 + start_epoch)
        logger.info("resumed from %s at epoch %d", resume, start_epoch)

    if info.is_main:
        prepare_from_config(C)
    if info.distributed:
        torch.distributed.barrier()
    loaders = TrainLoaders(C, rank=info.rank, world_size=info.world_size)
    step = DUEBStep(model, C, batch, amp)
    params = [p for p in model.parameters() if p.requires_grad]
    niters_full = C.niters_per_epoch
    niters = min(C.debug, niters_full) if C.debug else niters_full
    policy = PolyLR(C.lr, C.lr_power, C.nepochs * niters_full, niters_full * C.warm_up_epoch)
    log = _TrainLog(C, info.is_main)
    log.line(f"# DUEB {__version__}: aleatoric={step.use_aleatoric} energy={step.use_energy} "
             f"unsup={step.use_unsup} world_size={info.world_size} device={device} "
             f"amp={C.amp} noise={_noise_backend(step, device)} config={C.to_dict()}")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    snapshot_dir = Path(C.snapshot_dir)
    try:
        for epoch in range(start_epoch, C.nepochs):
            model.train()
            batches = loaders.epoch(epoch)
            bar = range(niters)
            if tqdm is not None and info.is_main:
                # iteration/total, it/s and ETA first, then the losses; at most BAR_WIDTH
                bar = tqdm(bar, file=sys.stdout, ncols=BAR_WIDTH, leave=False,
                           bar_format=BAR_FORMAT)
            t0 = time.time()
            for idx in bar:
                lab, u0, u1 = next(batches)
                lab, u0, u1 = (_to_device(b, device) for b in (lab, u0, u1))
                opt1.zero_grad(set_to_none=True)
                opt2.zero_grad(set_to_none=True)
                # backward runs inside the step, one branch's share at a time to free its
                # graph early; the optimisers only step after the finiteness check below
                t_global = epoch * niters_full + idx
                loss, terms, extras = step(lab, u0, u1,
                                           backward=lambda l: scaler.scale(l).backward(),
                                           iteration=t_global)
                lr = policy.get_lr(t_global)
                set_lr((opt1, opt2), lr)
                names = list(terms)
                stacked = torch.stack([terms[n].detach().float() for n in names])
                values = dict(zip(names, reduce_mean(stacked, info).tolist()))
                bad = [n for n in names if not math.isfinite(values[n])]
                if bad:
                    raise NonFiniteLossError(
                        f"loss term '{bad[0]}' is {values[bad[0]]} at epoch {epoch} iteration "
                        f"{idx} (global {t_global}); stopped before the optimiser step, the last "
                        f"checkpoint in {snapshot_dir} is intact. Try a lower lr or amp=off.")
                average_gradients(params, info)
                scaler.step(opt1)
                scaler.step(opt2)
                scaler.update()
                if info.is_main:
                    line = format_line(epoch, C.nepochs, idx, niters, lr, values)
                    log.line(line)
                    if hasattr(bar, "set_description_str"):
                        bar.set_description_str(bar_text(epoch, C.nepochs, values), refresh=False)
                    log.scalars(values, lr, t_global)
                    if C.tb_images_every and t_global % C.tb_images_every == 0:
                        log.images(extras, C, t_global)
            if info.is_main:
                if hasattr(bar, "close"):
                    bar.close()
                msg = (f"epoch {epoch + 1}/{C.nepochs} done in {time.time() - t0:.1f}s "
                       f"({(time.time() - t0) / max(1, niters):.3f}s/iter)")
                log.line("# " + msg)
                print(msg, flush=True)
                if should_save(C, epoch):
                    state = {"model": model.state_dict(), "optimizer_1": opt1.state_dict(),
                             "optimizer_2": opt2.state_dict(), "epoch": epoch,
                             "iteration": niters - 1, "global_iteration": t_global,
                             "config": C.to_dict(), "rng": ckpt_io.rng_state(),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                             "version": __version__}
                    path = ckpt_io.save_checkpoint(snapshot_dir, epoch, state, C.snapshot_keep)
                    log.line(f"# saved {path}")
            if C.stop_after_epoch is not None and epoch >= C.stop_after_epoch:
                break
        if info.distributed:
            # a cheap end-of-run guard that gradient averaging kept the replicas identical
            log.line(f"# max parameter difference across {info.world_size} ranks: "
                     f"{max_rank_divergence(model, info):.3e}")
    finally:
        log.close()
    return snapshot_dir
