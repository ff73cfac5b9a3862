"""U2PL: mean teacher with entropy-filtered pseudo labels and the unreliable-pixel
contrastive loss (Wang et al., CVPR 2022; spec methods/U2PL.md, faithful to its code).

One iteration (spec 3.4), after the warm-start epochs:

1. the teacher (eval mode) labels the unlabelled batch: pseudo labels and confidences;
2. with probability ``cutmix_prob`` the whole batch is CutMixed, image i taking one box
   covering half its area from image i+1 (images, labels and confidences alike);
3. the student runs on [labelled ; mixed]: supervised CE (or OHEM + 0.4 aux) on the labelled
   part; the teacher runs again on the same batch in train mode without grad (its BN
   statistics and dropout are live; its entropy, class ranks, probabilities and features
   drive the next two terms);
4. unsupervised CE on the pixels whose teacher entropy is below the epoch's percentile
   kappa_e = 100 - 20 (1 - e/E), times B*H*W / kept (quirk 8);
5. the contrastive loss (furnace.losses.contrastive) with the memory queues;
6. loss = sup + unsup + w_c contrastive, then the teacher follows the student by EMA.

Warm start: for ``sup_only_epoch`` epochs the student learns from labelled data only and the
teacher only runs train-mode passes on the labelled batch (its BN statistics). During the
epoch ``sup_only_epoch`` the teacher's parameters equal the student's after every step; from
the next epoch on they are an EMA with decay min(1 - 1/(k+1), 0.99). BN buffers are never
copied. The student is validated while the teacher is not yet in use, the teacher after.

``u2pl_suponly`` is U2PL's SupOnly baseline: the same network without the representation
head, trained on the labelled data only.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..data.cutmix import half_box, mix_with_next
from ..losses import OhemCrossEntropy, SupervisedCrossEntropy
from ..losses.contrastive import MemoryBank, unreliable_contrastive_loss
from ..losses.reliability import (entropy, entropy_masks, keep_percent,
                                  reliable_pseudo_label_loss, unreliable_percent)
from ..models import u2pl_network_from_config
from .base import Method, MethodContext, upcast
from .presets import BUILTIN_PRESETS
from .registry import register
from .common import IGNORE

# defaults of the two contrastive modes (spec 3.7 and Table A1): anchors, keys, weight
MODE_DEFAULTS = {"reference": (256, 50, None), "paper": (50, 256, 0.1)}


def contrastive_weights(weight, world_size: int):
    """(gradient weight, logged weight) of the contrastive loss computed on one process.

    ``weight`` None is the reference: it all-reduces the loss in place and divides by W, so
    the value it prints is the mean over processes but the gradient is the local one / W
    (spec 3.7 F, C11); the engine then averages gradients across processes as DDP does. A
    number is the effective weight itself (the paper's lambda_c = 0.1)."""
    if weight is None:
        return 1.0 / world_size, 1.0
    return float(weight), float(weight)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear with align_corners=True, the reference's resize of every logit map."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def downsample_labels(label: torch.Tensor, size) -> torch.Tensor:
    """Nearest resize of an int label map [B,H,W] (source index floor(i * in / out)),
    which equals the reference's nearest resize of the one-hot maps."""
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


def u2pl_sgd(net: torch.nn.Module, C: Config) -> torch.optim.SGD:
    """SGD with two groups: the encoder (lr) and the rest (lr x head_lr_mult); weight decay
    on every parameter, BN and biases included, as the reference."""
    mult = float(C.u2pl.head_lr_mult)
    groups = [dict(params=net.backbone_parameters(), lr=C.lr, lr_mult=1.0, name="backbone"),
              dict(params=net.head_parameters(), lr=C.lr * mult, lr_mult=mult, name="head")]
    return torch.optim.SGD(groups, lr=C.lr, momentum=C.momentum, weight_decay=C.weight_decay)


class SupervisedLoss:
    """CE over labelled pixels (VOC) or OHEM on pred + aux_weight x OHEM on aux (Cityscapes),
    both at crop resolution; OHEM's min_kept is per process batch as the reference."""

    def __init__(self, C: Config):
        self.aux_weight = float(C.u2pl.aux_weight)
        if C.sup_loss == "ohem":
            self.ce = OhemCrossEntropy(IGNORE, C.ohem_thresh, int(C.u2pl.ohem_min_kept))
        else:
            self.ce = SupervisedCrossEntropy(ignore_index=IGNORE)

    def __call__(self, out: Dict[str, torch.Tensor], label: torch.Tensor, n: int
                 ) -> torch.Tensor:
        size = label.shape[-2:]
        loss = self.ce(upsample(out["pred"][:n], size), label)
        if self.aux_weight > 0:
            loss = loss + self.aux_weight * self.ce(upsample(out["aux"][:n], size), label)
        return loss


def _raw(net, x: torch.Tensor, amp) -> Dict[str, torch.Tensor]:
    """The network's raw outputs (stride-4 ``pred``, ``rep``, ``aux``) under autocast ``amp``
    (None: full precision), half precision upcast to float32 for the losses."""
    cast = (torch.autocast(x.device.type, dtype=amp) if amp is not None
            else contextlib.nullcontext())
    with cast:
        out = net(x, raw=True)
    return {k: upcast(v) for k, v in out.items()}


@register
class U2PL(Method):
    """Student ``model`` and EMA teacher ``teacher`` (both in the checkpoint), one SGD
    ``optimizer`` over the student; the memory queues and the CutMix RNG in ``extra``."""

    name = "u2pl"
    streams = ("labeled", "unlabeled0")
    presets = BUILTIN_PRESETS["u2pl"]

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        o = self.o = C.u2pl
        if o.contrastive != "off" and not o.rep_head:
            raise ValueError("config u2pl.contrastive needs the representation head; set "
                             "u2pl.rep_head=True or u2pl.contrastive=off")
        self.student = ctx.prepare(u2pl_network_from_config(C))
        # built separately, as the reference: its decoder gets its own random init
        self.teacher = ctx.prepare(u2pl_network_from_config(C))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.modules = {"model": self.student, "teacher": self.teacher}
        self.optimizers = {"optimizer": u2pl_sgd(self.student, C)}
        self.sup_loss = SupervisedLoss(C)
        self.amp = ctx.amp
        self.niters = int(ctx.niters_per_epoch)
        self.nepochs = int(C.nepochs)
        # identical on every rank (the reference seeds NumPy alike everywhere), so boxes and
        # the CutMix decision agree across processes
        self.rng = np.random.RandomState(int(C.seed) % 2 ** 32)
        q, n, w = MODE_DEFAULTS.get(o.contrastive, (256, 50, None))
        self.num_queries = int(o.num_queries or q)
        self.num_negatives = int(o.num_negatives or n)
        self.contrastive_weight, self.contra_log_weight = contrastive_weights(
            o.contrastive_weight if o.contrastive_weight is not None else w, ctx.world_size)
        dim = int(o.rep_dim)
        sizes = [int(o.queue_size_first)] + [int(o.queue_size)] * (C.num_classes - 1)
        self.bank = MemoryBank(sizes, dim, device=ctx.device)
        self.epoch = 0

    # -- teacher
    def teacher_active(self, epoch: int) -> bool:
        return epoch >= int(self.o.sup_only_epoch)

    @torch.no_grad()
    def copy_student(self) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.copy_(s)

    @torch.no_grad()
    def after_step(self, *, iteration: int, epoch: int) -> None:
        start = int(self.o.sup_only_epoch)
        if epoch < start:
            return
        if epoch == start:
            self.copy_student()      # the reference aliases T to S throughout this epoch
            return
        k = iteration - self.niters * start
        d = min(1.0 - 1.0 / (k + 1), float(self.o.ema_decay))
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(d).add_(s, alpha=1.0 - d)

    # -- one iteration
    def train_step(self, batches, *, iteration, epoch, backward):
        lab, unl = batches
        self.epoch = epoch
        x_l, y_l = lab["data"], lab["label"]
        n = x_l.shape[0]
        self.student.train()
        if not self.teacher_active(epoch):
            out = _raw(self.student, x_l, self.amp)
            loss = self.sup_loss(out, y_l, n)
            self.teacher.train()
            with torch.no_grad():
                _raw(self.teacher, x_l, self.amp)    # only the teacher's BN statistics
            backward(loss)
            loss = loss.detach()
            extras = {"image": x_l, "label": y_l,
                      "logits": upsample(out["pred"].detach(), y_l.shape[-2:])}
            return loss, {"loss_sup": loss, "loss": loss}, extras
        if epoch == int(self.o.sup_only_epoch):
            self.copy_student()

        x_u = unl["data"]
        size = x_u.shape[-2:]
        with torch.no_grad():
            self.teacher.eval()
            prob = torch.softmax(upsample(_raw(self.teacher, x_u, self.amp)["pred"],
                                          size), dim=1)
            pseudo = prob.argmax(dim=1)    # (the confidences the reference also mixes
            self.teacher.train()           # are never used afterwards)
        mixed = float(self.rng.uniform(0, 1) < float(self.o.cutmix_prob))
        if mixed:
            boxes = [half_box(self.rng, size[0], size[1]) for _ in range(x_u.shape[0])]
            x_u, pseudo = mix_with_next(boxes, x_u, pseudo)

        x_all = torch.cat([x_l, x_u])
        out = _raw(self.student, x_all, self.amp)
        sup = self.sup_loss(out, y_l, n)
        with torch.no_grad():
            t_out = _raw(self.teacher, x_all, self.amp)
            t_prob = torch.softmax(t_out["pred"], dim=1)            # stride 4
            # the reliability of both losses: entropy of the train-mode teacher's softmax
            h = entropy(torch.softmax(upsample(t_out["pred"][n:], size), dim=1))
        keep = keep_percent(float(self.o.drop_percent), epoch, self.nepochs)
        unsup, kept = reliable_pseudo_label_loss(
            upsample(out["pred"][n:], size), pseudo, keep, h, self.o.unsup_weight_mode,
            IGNORE)
        unsup = float(self.o.unsup_weight) * unsup
        terms = {"loss_sup": sup.detach(), "loss_unsup": unsup.detach(), "kept": kept,
                 "cutmix": torch.tensor(mixed, device=x_l.device)}
        loss = sup + unsup
        if self.o.contrastive != "off":
            contra = self._contrastive(out["rep"], t_out["rep"], t_prob, h, y_l, pseudo,
                                       epoch, n, terms)
            loss = loss + self.contrastive_weight * contra
            # logged as the reference prints it: the mean over processes (the engine's
            # reduction) of loss_weight x L_c, without the 1/W its gradient carries
            terms["loss_contra"] = self.contra_log_weight * contra.detach()
        backward(loss)
        loss = loss.detach()
        terms["loss"] = terms["loss_sup"] + terms["loss_unsup"] + terms.get(
            "loss_contra", 0.0)
        extras = {"image": x_l, "label": y_l,
                  "logits": upsample(out["pred"][:n].detach(), y_l.shape[-2:])}
        return loss, terms, extras

    def _contrastive(self, rep, rep_t, t_prob, h, y_l, pseudo, epoch, n, terms):
        o = self.o
        with torch.no_grad():
            valid = pseudo != IGNORE
            alpha = unreliable_percent(float(o.low_entropy_threshold), epoch, self.nepochs)
            low, high = entropy_masks(h, valid, alpha)
            if o.contrastive == "paper":
                # anchors from every reliable pixel (H below the unsupervised loss's cut)
                keep = keep_percent(float(o.drop_percent), epoch, self.nepochs)
                low = valid & ~entropy_masks(h, valid, 100.0 - keep)[1]
            small = rep.shape[-2:]
            label_l = downsample_labels(y_l, small)
            label_u = downsample_labels(pseudo, small)
            low = downsample_labels(low.long(), small).bool()
            high = downsample_labels(high.long(), small).bool()
        loss, stats = unreliable_contrastive_loss(
            rep, rep_t, label_l, label_u, t_prob[:n], t_prob[n:], low, high, self.bank,
            mode=o.contrastive, low_rank=int(o.low_rank), high_rank=int(o.high_rank),
            delta_p=float(o.delta_p), delta_n=float(o.delta_n),
            num_queries=self.num_queries, num_negatives=self.num_negatives,
            temperature=float(o.temperature), ignore_index=IGNORE)
        dev = rep.device
        terms["valid_classes"] = torch.tensor(float(len(stats.valid_classes)), device=dev)
        terms["queue_mean"] = torch.tensor(float(np.mean(self.bank.lengths())), device=dev)
        return loss

    # -- evaluation, checkpoints, logs
    def eval_model(self) -> torch.nn.Module:
        return self.teacher if self.teacher_active(self.epoch) else self.student

    @classmethod
    def eval_weights_key(cls, checkpoint: Mapping[str, Any]) -> str:
        extra = checkpoint.get("extra") or {}
        return str(extra.get("eval_key", "teacher"))

    @classmethod
    def build_eval_model(cls, C: Config) -> torch.nn.Module:
        return u2pl_network_from_config(C, pretrained=False)

    def extra_state(self) -> Dict[str, Any]:
        _, keys, pos, has_gauss, gauss = self.rng.get_state()
        state: Dict[str, Any] = {
            "epoch": int(self.epoch),
            "eval_key": "teacher" if self.teacher_active(self.epoch) else "model",
            "cutmix_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "gauss": float(gauss)}}
        if self.o.save_queues:
            state["queues"] = self.bank.state_dict()
        return state

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        r = state.get("cutmix_rng")
        if r is not None:
            self.rng.set_state(("MT19937", r["keys"].numpy().astype(np.uint32), r["pos"],
                                r["has_gauss"], r["gauss"]))
        if "queues" in state:
            self.bank.load_state_dict(state["queues"])

    def describe(self) -> str:
        o = self.o
        return (f"contrastive={o.contrastive} (weight {self.contrastive_weight:g}, "
                f"{self.num_queries} anchors x {self.num_negatives} keys) "
                f"sup_only_epoch={o.sup_only_epoch} ema={o.ema_decay} "
                f"head_lr_mult={o.head_lr_mult} cutmix_prob={o.cutmix_prob}")

    def log_line(self, values: Mapping[str, float]) -> str:
        parts = [f"loss={values['loss']:.2f} [sup={values['loss_sup']:.2f}"]
        for k, name in (("loss_unsup", "unsup"), ("loss_contra", "contra")):
            if k in values:
                parts.append(f"{name}={values[k]:.2f}")
        head = " ".join(parts) + "]"
        if "kept" in values:
            head += (f" kept={values['kept']:.3f} cutmix={values['cutmix']:.2f}")
        if "valid_classes" in values:
            head += (f" V={values['valid_classes']:.1f} "
                     f"queue={values['queue_mean']:.0f}")
        return head


def suponly_config(C: Config) -> Config:
    """The config without the representation head (SupOnly never uses it)."""
    C = copy.deepcopy(C)
    C.u2pl.rep_head = False
    return C


@register
class U2PLSupOnly(Method):
    """U2PL's SupOnly baseline (``train_sup.py``): one network without the representation
    head, labelled data only, the same supervised loss and optimiser groups."""

    name = "u2pl_suponly"
    streams = ("labeled",)
    presets = BUILTIN_PRESETS["u2pl_suponly"]

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        self.net = ctx.prepare(u2pl_network_from_config(suponly_config(C)))
        self.modules = {"model": self.net}
        self.optimizers = {"optimizer": u2pl_sgd(self.net, C)}
        self.sup_loss = SupervisedLoss(C)
        self.amp = ctx.amp

    def train_step(self, batches, *, iteration, epoch, backward):
        (lab,) = batches
        out = _raw(self.net, lab["data"], self.amp)
        loss = self.sup_loss(out, lab["label"], lab["data"].shape[0])
        backward(loss)
        loss = loss.detach()
        extras = {"image": lab["data"], "label": lab["label"],
                  "logits": upsample(out["pred"].detach(), lab["label"].shape[-2:])}
        return loss, {"loss_sup": loss, "loss": loss}, extras

    @classmethod
    def build_eval_model(cls, C: Config) -> torch.nn.Module:
        return u2pl_network_from_config(suponly_config(C), pretrained=False)

    def log_line(self, values) -> str:
        return f"loss={values['loss']:.2f} [sup={values['loss_sup']:.2f}]"
