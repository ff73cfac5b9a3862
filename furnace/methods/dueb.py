"""DUEB: the dual-branch step with aleatoric, energy and intersection/union pseudo-label losses.

One iteration follows the reference order exactly (REFERENCE 3.1): supervised passes of both
branches, four no-grad teacher passes in train mode (b1(u0), b1(u1), b2(u0), b2(u1)), CutMix of
the teacher logits, pseudo labels, two student passes on the mixed batch, then

    loss = S1 + S2 + lambda (U_inter + U_union)
         + 0.5 A(z1s) + 0.5 A(z2s) + A(z1u) + A(z2u)          (aleatoric switch)
         + 0.5 E(z1s) + 0.5 E(z2s) + E(z1u) + E(z2u)          (energy switch)

Presets: ``full`` (train.py), ``aleatoric`` (trainal.py), ``energy`` (traine.py), ``cpcl``
(traincpcl.py, both switches off). Switched-off terms are not computed at all. Options live in
the group ``C.dueb`` (``dueb.aleatoric.*``, ``dueb.energy.*``, ``dueb.unsup_weight``,
``dueb.fuse_passes``), declared with its checks and old top-level names in
:mod:`.dueb_options`.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import Config
from ..losses import AleatoricLoss, energy_term, pseudo_labels, unsup_ce
from ..models import network_from_config
from ..precision import autocast, upcast
from .base import STREAMS, Method, MethodContext
from .common import IGNORE, make_sgd, sup_criterion
from .dueb_options import OPTIONS  # C.dueb: defaults, checks, old names (torch-free)
from .presets import BUILTIN_PRESETS
from .registry import register

# Log-line layout of REFERENCE 1.8, with balanced brackets.
UNSUP_FIELDS = ("inter", "union", "predlog_unsup1", "predlog_unsup2")
SUP_FIELDS = ("sup_1", "sup_2", "overlap", "predlog_sup1", "predlog_sup2")


def options(C: Config) -> Tuple[Config, Config]:
    """The (aleatoric, energy) option groups, ``C.dueb.aleatoric`` and ``C.dueb.energy``."""
    return C.dueb.aleatoric, C.dueb.energy


class DUEBStep:
    """Computes the loss terms of one DUEB iteration.

    ``model`` is the dual-branch network; batches are dicts of device tensors:
    ``lab = {'data': [B,3,H,W] float, 'label': [B,H,W] int64}``,
    ``u0 = {'data': [B,3,H,W], 'mask': [B,1,H,W] in {0,1}}``, ``u1 = {'data': [B,3,H,W]}``.
    ``C.dueb.supervised_only`` (legacy) leaves out the unlabelled terms; the engine trains
    that setting with the ``supervised`` method instead.
    """

    def __init__(self, model: torch.nn.Module, C: Config, batch_per_process: int,
                 amp: Optional[torch.dtype] = None):
        self.model = model
        self.C = C
        self.amp = amp
        self.al, self.en = options(C)
        self.use_aleatoric = bool(self.al.enabled)
        self.use_energy = bool(self.en.enabled)
        self.use_unsup = not C.dueb.supervised_only
        self.sup_criterion = sup_criterion(C, batch_per_process)
        if self.use_aleatoric:
            self.aleatoric = AleatoricLoss(self.al.samples, IGNORE,
                                           learn_variance=self.al.learn_variance,
                                           per_pixel=self.al.per_pixel)

    def forward(self, step: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits [B,C,H,W] and var [B,1,H,W] of branch ``step``; half precision (AMP) is
        upcast to float32 for the losses, float32 and float64 stay as they are."""
        with autocast(x.device.type, self.amp):
            _, logits, var = self.model(x, step=step)
        return upcast(logits), upcast(var)

    def _teachers(self, u0: torch.Tensor, u1: torch.Tensor, mask: torch.Tensor):
        """Mixed teacher logits of both branches (no grad, train mode as the reference)."""
        mixed = []
        with torch.no_grad():
            if self.C.dueb.fuse_passes:
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
        ``dueb.aleatoric.start_iter`` (None: always in).
        """
        o, al, en = self.C.dueb, self.al, self.en
        use_aleatoric = self.use_aleatoric and (
            iteration is None or iteration >= int(al.start_iter))
        imgs, gts = lab["data"], lab["label"]
        terms: Dict[str, torch.Tensor] = {}
        fused = o.fuse_passes and self.use_unsup
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
                part = part + en.sup_weight * terms[f"predlog_sup{k}"]
            if use_aleatoric:
                al_sup.append(al.sup_weight * self.aleatoric(z, v, gts))
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
                part = o.unsup_weight * terms[name]
                if use_aleatoric:
                    al_unsup.append(al.unsup_weight * self.aleatoric(z, v, label))
                    part = part + al_unsup[-1]
                if self.use_energy:
                    terms[f"predlog_unsup{k}"] = energy_term(F.softmax(z, dim=1), label, IGNORE)
                    part = part + en.unsup_weight * terms[f"predlog_unsup{k}"]
                add(part)
            terms["loss_unsup"] = o.unsup_weight * (terms["inter"] + terms["union"])
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


def make_optimizer(branch: torch.nn.Module, C: Config) -> torch.optim.SGD:
    """SGD over one branch's reference groups (the variance head only if learned)."""
    return make_sgd(branch, C, learn_variance=options(C)[0].learn_variance)


@register
class DUEB(Method):
    """The dual-branch DUEB method (and CPCL with both switches off).

    Checkpoint keys as the reference: ``model`` (``branch1.*``, ``branch2.*``),
    ``optimizer_1``, ``optimizer_2``.
    """

    name = "dueb"
    streams = STREAMS
    presets = BUILTIN_PRESETS["dueb"]
    option_group = OPTIONS

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        self.net = ctx.prepare(network_from_config(C))
        self.modules = {"model": self.net}
        self.optimizers = {"optimizer_1": make_optimizer(self.net.branch1, C),
                           "optimizer_2": make_optimizer(self.net.branch2, C)}
        self.step = DUEBStep(self.net, C, ctx.batch_per_process, ctx.amp)

    def train_step(self, batches, *, iteration, epoch, backward):
        return self.step(*batches, backward=backward, iteration=iteration)

    @classmethod
    def build_eval_model(cls, C: Config) -> torch.nn.Module:
        return network_from_config(C, pretrained=False)

    def describe(self) -> str:
        return (f"aleatoric={self.step.use_aleatoric} energy={self.step.use_energy} "
                f"unsup={self.step.use_unsup}")

    def log_line(self, values: Mapping[str, float]) -> str:
        """REFERENCE 1.8's fields, %.2f, balanced brackets."""
        def fmt(names):
            return ", ".join(f"{n}={values[n]:.2f}" for n in names if n in values)

        parts = [f"loss={values['loss']:.2f}"]
        if "loss_unsup" in values:
            parts.append(f"[loss_unsup={values['loss_unsup']:.2f} ({fmt(UNSUP_FIELDS)})]")
        parts.append(f"[loss_sup={values['loss_sup']:.2f} ({fmt(SUP_FIELDS)})]")
        for n in ("loss_all", "loss_all_unsup"):
            if n in values:
                parts.append(f"{n}={values[n]:.2f}")
        return " ".join(parts)
