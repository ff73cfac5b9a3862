"""LPL: learning pseudo labels from a few pixel labels and image-level labels (Wang et al.,
Pattern Recognition 2022; spec methods/LPL.md, faithful to YudeWang/Learning-Pseudo-Label).

Two methods, the reference's two training stages (options ``C.lpl``, :mod:`.lpl_options`):

``lpl`` (stage 1, the reference's ``train.py``): HybridNet H and PseudoNet P, two
independent DeepLabv3+ networks with their own SGD, on one tensor per iteration: the strong
half (pixel-labelled images, strong augmentation) and the weak half (any training image, crop
only), each image with its image-level label y (the classes present). One iteration:

1. H and P forward on both halves (train mode; BatchNorm over all of them);
2. class-aware softmax (CCE: over the classes in y only, the reference's epsilons) of both;
   restricted argmax pseudo labels on the weak half, the GT crop instead for a labelled image
   drawn into it (``gt_replace``);
3. L_cls: multi-label soft margin on H's max-pooled logits (all images, background out);
   L_sup: CCE of H on the strong half's pixel labels; L_pseudo: CCE of P towards H's pseudo
   labels;
4. the IoU tracker (decayed per-class counts of P's restricted prediction against the strong
   half's GT, summed over ranks) and the PCT weight of every weak image: (its worst present
   class's running IoU) ** gamma, a zero IoU counting as 1;
5. L_pct: CCE of H towards P's pseudo labels, weighted per image, over all weak pixels;
6. loss = L_sup + L_pseudo + L_cls + L_pct, one backward (one GradScaler), both optimisers
   step; H's lr follows poly, P's stays constant (``pseudonet_poly=False``).

``lpl_retrain`` (stage 2, ``retrain.py`` as ``run.py`` configures it): one fresh network,
plain CE on GT (pixel-labelled ids) and exported pseudo labels (the rest), strong
augmentation, the loader in one fixed order (``lpl.shuffle=False``).

Between them, ``export.py`` writes HybridNet's multi-scale, class-restricted pseudo labels
(:mod:`furnace.eval.export`); ``lplpipeline.py`` runs the four stages in order.

Not reproduced: the reference's epochs of 2116 iterations (ours: niters_per_epoch, the
weak sampler reshuffles at each epoch), its draws, and its resume (it has none: the tracker
rides in our checkpoints).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..data.loader import StreamSpec
from ..data.lpl import lpl_retrain_dataset, lpl_strong_dataset, lpl_weak_dataset
from ..engine.lr import ConstantLR, PolyLR
from ..losses.lpl import (IoUTracker, cce_loss, class_aware_softmax, multilabel_cls_loss,
                          pct_loss, pct_weights, replace_with_gt, restricted_argmax)
from ..models.lpl import lpl_network_from_config, lpl_param_groups
from ..precision import autocast
from .base import Method, MethodContext
from .common import sup_criterion
from .lpl_options import OPTIONS  # C.lpl: defaults, checks (torch-free)
from .presets import BUILTIN_PRESETS
from .registry import register

IGNORE = 255


def make_lpl_sgd(net: nn.Module, C: Config) -> torch.optim.SGD:
    """The reference's SGD: three groups (backbone, head, cls_conv at ``lpl.lr_mults``),
    momentum, weight decay on every parameter (BN and biases too)."""
    groups = lpl_param_groups(net, float(C.lr), tuple(float(m) for m in C.lpl.lr_mults),
                              float(C.weight_decay))
    return torch.optim.SGD(groups, lr=float(C.lr), momentum=float(C.momentum),
                           weight_decay=float(C.weight_decay))


def lpl_poly(C: Config, total_iters: int, warmup_iters: int = 0) -> PolyLR:
    """The reference's poly: base x (1 - t / (total + 1e-5)) ** power (spec 5, check F)."""
    return PolyLR(C.lr, C.lr_power, total_iters, warmup_iters, eps=1e-5)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The tracker's per-batch counts summed over the processes (every rank then holds the
    state one GPU with the whole batch would hold)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _retrain_shuffles(C: Config) -> bool:
    """Stage 2's loader: one fixed order every epoch (``lpl.shuffle=False``, the reference's
    shuffle=False: the pixel-labelled images first) or a new one per epoch."""
    return bool(C.lpl.shuffle)


STREAMS = (StreamSpec("strong", "train", 0, dataset=lpl_strong_dataset),
           StreamSpec("weak", "unlabeled", 1, dataset=lpl_weak_dataset))


@register
class LPL(Method):
    """Modules ``hybrid`` (HybridNet) and ``pseudo`` (PseudoNet); optimisers
    ``optimizer_hybrid`` and ``optimizer_pseudo``; the IoU tracker in the method state."""

    name = "lpl"
    streams = STREAMS
    presets = BUILTIN_PRESETS["lpl"]
    checkpoint_model_key = "hybrid"
    option_group = OPTIONS

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        o = self.o = C.lpl
        # the two networks are drawn one after the other from one seed, as the reference:
        # the same backbone weights (ImageNet), different heads
        self.hybrid = ctx.prepare(lpl_network_from_config(C))
        self.pseudo = ctx.prepare(lpl_network_from_config(C))
        self.modules = {"hybrid": self.hybrid, "pseudo": self.pseudo}
        self.optimizers = {"optimizer_hybrid": make_lpl_sgd(self.hybrid, C),
                           "optimizer_pseudo": make_lpl_sgd(self.pseudo, C)}
        self.tracker = IoUTracker(int(C.num_classes), float(o.score_momentum),
                                  device=ctx.device)
        self.gamma = float(o.gamma)
        self.stable = bool(o.stable_cce)

    def lr_schedules(self, total_iters: int, warmup_iters: int = 0) -> Dict[str, Any]:
        poly = lpl_poly(self.C, total_iters, warmup_iters)
        return {"optimizer_hybrid": poly,
                "optimizer_pseudo": poly if self.o.pseudonet_poly else ConstantLR(self.C.lr)}

    # -- one iteration (spec 3.7)
    def train_step(self, batches, *, iteration, epoch, backward):
        strong, weak = batches
        b = len(strong["data"])
        x = torch.cat([strong["data"], weak["data"]])
        y = torch.cat([strong["category"], weak["category"]]).float()
        dev = x.device
        # 1. both networks on the same tensor
        with autocast(dev.type, self.ctx.amp):
            z_h = self.hybrid(x)
            z_p = self.pseudo(x)
        # 2. class-aware probabilities (fp32) and the weak half's pseudo labels
        prob_h, logq_h = class_aware_softmax(z_h, y, stable=self.stable)
        prob_p, logq_p = class_aware_softmax(z_p, y, stable=self.stable)
        gt_w = weak["label"].long()
        labelled = weak["is_labelled"].bool() & (gt_w != IGNORE).flatten(1).any(1)
        if not self.o.gt_replace:
            labelled = torch.zeros_like(labelled)
        with torch.no_grad():
            pl_h = replace_with_gt(restricted_argmax(prob_h[b:]), gt_w, labelled)
            pl_p = replace_with_gt(restricted_argmax(prob_p[b:]), gt_w, labelled)
        # 3. H: classification and supervised CCE; P: towards H's pseudo labels
        loss_cls = multilabel_cls_loss(z_h, y)
        gt_s = strong["label"].long()
        loss_sup = cce_loss(logq_h[:b], gt_s)
        loss_pseudo = cce_loss(logq_p[b:], pl_h)
        # 4. the dynamic evaluation of P on the strong half, then the admission weights
        with torch.no_grad():
            self.tracker.update(gt_s, restricted_argmax(prob_p[:b]), reduce=_sum_over_ranks)
            weights = pct_weights(self.tracker.iou(), y[b:], self.gamma)
        # 5. H towards P's pseudo labels, per-image weights, all pixels in the divisor
        loss_pct = pct_loss(cce_loss(logq_h[b:], pl_p, reduction="none"), weights)
        loss = loss_sup + loss_pseudo + loss_cls + loss_pct
        backward(loss)
        terms = {"loss_sup": loss_sup.detach(), "loss_pseudo": loss_pseudo.detach(),
                 "loss_cls": loss_cls.detach(), "loss_pct": loss_pct.detach(),
                 "pct_weight": weights.mean().detach(), "loss": loss.detach()}
        extras = {"image": x[:b], "label": gt_s, "logits": z_h[:b].detach().float()}
        return terms["loss"], terms, extras

    # -- evaluation
    def eval_models(self) -> Dict[str, nn.Module]:
        """Both networks (the README reports both), HybridNet only, or none (``validate``)."""
        v = self.o.validate
        if v == "none":
            return {}
        models = {"hybrid": self.hybrid}
        if v == "both":
            models["pseudo"] = self.pseudo
        return models

    @classmethod
    def build_eval_model(cls, C: Config) -> nn.Module:
        return lpl_network_from_config(C, pretrained=False)

    @classmethod
    def eval_weights_key(cls, checkpoint: Mapping[str, Any]) -> str:
        """``hybrid`` (what run.py tests and labels with), or ``pseudo`` when the run chose
        ``lpl.eval_network=pseudo`` (recorded in the file's config)."""
        cfg = checkpoint.get("config") or {}
        return str((cfg.get("lpl") or {}).get("eval_network", "hybrid"))

    # -- checkpoints and logs
    def extra_state(self) -> Dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])

    def describe(self) -> str:
        o = self.o
        return (f"gamma={o.gamma} score_momentum={o.score_momentum} lr_mults={list(o.lr_mults)} "
                f"pseudonet_poly={o.pseudonet_poly} gt_replace={o.gt_replace} "
                f"stable_cce={o.stable_cce} image_labels={self.C.get('image_labels')}")

    def log_line(self, values: Mapping[str, float]) -> str:
        return (f"loss={values['loss']:.3f} [sup={values['loss_sup']:.3f} "
                f"pseudo={values['loss_pseudo']:.3f} cls={values['loss_cls']:.3f} "
                f"pct={values['loss_pct']:.4f}] w={values['pct_weight']:.4f}")


@register
class LPLRetrain(Method):
    """Stage 2: one network ``model`` and its SGD ``optimizer``, plain CE (ignore 255, mean
    over valid pixels) on the exported list (GT for pixel-labelled ids, pseudo labels for the
    rest), the strong augmentation."""

    name = "lpl_retrain"
    streams = (StreamSpec("labeled", "train", 0, dataset=lpl_retrain_dataset,
                          shuffle=_retrain_shuffles),)
    presets = BUILTIN_PRESETS["lpl_retrain"]
    option_group = OPTIONS

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        self.net = ctx.prepare(lpl_network_from_config(C))
        self.modules = {"model": self.net}
        self.optimizers = {"optimizer": make_lpl_sgd(self.net, C)}
        self.criterion = sup_criterion(C, ctx.batch_per_process)

    def lr_schedules(self, total_iters: int, warmup_iters: int = 0) -> Dict[str, Any]:
        return {"optimizer": lpl_poly(self.C, total_iters, warmup_iters)}

    def train_step(self, batches, *, iteration, epoch, backward):
        (lab,) = batches
        with autocast(lab["data"].device.type, self.ctx.amp):
            logits = self.net(lab["data"])
        logits = logits.float()
        loss = self.criterion(logits, lab["label"].long())
        backward(loss)
        loss = loss.detach()
        extras = {"image": lab["data"], "label": lab["label"], "logits": logits.detach()}
        return loss, {"loss": loss}, extras

    @classmethod
    def build_eval_model(cls, C: Config) -> nn.Module:
        return lpl_network_from_config(C, pretrained=False)
