"""U2PL: mean teacher with entropy-filtered pseudo labels and the unreliable-pixel
contrastive loss (Wang et al., CVPR 2022; spec methods/U2PL.md, faithful to its code).

One iteration (spec 3.4), after the warm-start epochs:

1. the teacher (eval mode) labels the unlabelled batch: pseudo labels and confidences;
2. with probability ``cutmix_prob`` the whole batch is CutMixed, image i taking one box
   covering half its area from the next image of its reference group (images and labels);
3. the student runs on [labelled ; mixed]: supervised CE (or OHEM + 0.4 aux) on the labelled
   part; the teacher runs again on the same batch in train mode without grad (its BN
   statistics and dropout are live; its entropy, class ranks, probabilities and features
   drive the next two terms);
4. unsupervised CE on the pixels whose teacher entropy is below the epoch's percentile
   kappa_e = 100 - 20 (1 - e/E), times B*H*W / kept (quirk 8);
5. the contrastive loss (furnace.losses.contrastive) with the memory queues;
6. loss = sup + unsup + w_c contrastive, then the teacher follows the student by EMA.

Every per-GPU quantity of the reference (spec 10.2: percentiles, the one-hot union of its
``label_onehot``, the contrastive loss with V and its draws, OHEM's min_kept, the losses'
means) is computed per reference group (``ctx.groups``, from ``reference_gpus``), and the
process loss is the mean over its groups, so any launch trains as the reference's GPUs did.

Warm start: for ``sup_only_epoch`` epochs the student learns from labelled data only and the
teacher only runs train-mode passes on the labelled batch (its BN statistics). During the
epoch ``sup_only_epoch`` the teacher's parameters equal the student's after every step; from
the next epoch on they are an EMA with decay min(1 - 1/(k+1), 0.99). BN buffers are never
copied. The student is validated while the teacher is not yet in use, the teacher after.

``u2pl_suponly`` is U2PL's SupOnly baseline: the same network without the representation
head, trained on the labelled data only.

Options: the group ``C.u2pl``, its defaults and checks in :mod:`.u2pl_options`.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..data.cutmix import half_box, mix_with_next
from ..losses import OhemCrossEntropy, SupervisedCrossEntropy
from ..losses.contrastive import (MemoryBank, contrastive_from_masks, contrastive_masks,
                                  label_onehot, negative_keys)
from ..losses.reliability import (entropy, entropy_masks, keep_percent,
                                  reliable_pseudo_label_loss, unreliable_percent)
from ..models import u2pl_network_from_config
from ..precision import autocast, upcast
from ..resize import upsample
from .base import Method, MethodContext
from .groups import ReferenceGroups, group_seed
from .presets import BUILTIN_PRESETS
from .registry import register
from .common import IGNORE, ema_update
from .u2pl_options import OPTIONS  # C.u2pl: defaults, checks (torch-free)

# defaults of the two contrastive modes (spec 3.7, Table A1 and 10.1): anchors, keys, weight,
# one-hot of the labels ('union': the reference's label_onehot, per group)
MODE_DEFAULTS = {"reference": (256, 50, None, "union"), "paper": (50, 256, 0.1, "exact")}


def contrastive_weights(weight, reference_gpus: int):
    """(gradient weight, logged weight) of the contrastive loss of one reference group.

    ``weight`` None is the reference: it all-reduces the loss in place and divides by its GPU
    count W, so the value it prints is the mean over GPUs but the gradient is the local one / W
    (spec 3.7 F, C11, 10.3: 0.25 on VOC, 0.125 on Cityscapes); gradients are then averaged
    over the groups as DDP does. A number is the effective weight itself (the paper's
    lambda_c = 0.1)."""
    if weight is None:
        return 1.0 / reference_gpus, 1.0
    return float(weight), float(weight)


def draw_generator(seed: int, iteration: int, group: int) -> torch.Generator:
    """The CPU generator of a group's contrastive draws at one iteration
    (:func:`~furnace.methods.groups.group_seed`)."""
    return torch.Generator().manual_seed(group_seed(seed, iteration, group))


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
    both at crop resolution, per reference group (a GPU's batch: its own mean and OHEM's
    min_kept), averaged over the groups as DDP averages the GPUs' gradients."""

    def __init__(self, C: Config, groups: ReferenceGroups):
        self.aux_weight = float(C.u2pl.aux_weight)
        self.groups = groups
        if C.sup_loss == "ohem":
            self.ce = OhemCrossEntropy(IGNORE, C.ohem_thresh, int(C.u2pl.ohem_min_kept))
        else:
            self.ce = SupervisedCrossEntropy(ignore_index=IGNORE)

    def __call__(self, out: Dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        n = label.shape[0]
        size = label.shape[-2:]
        pred = upsample(out["pred"][:n], size)
        aux = upsample(out["aux"][:n], size) if self.aux_weight > 0 else None
        losses = []
        for sl in self.groups.slices(n):
            loss = self.ce(pred[sl], label[sl])
            if aux is not None:
                loss = loss + self.aux_weight * self.ce(aux[sl], label[sl])
            losses.append(loss)
        return torch.stack(losses).mean()


def _raw(net, x: torch.Tensor, amp) -> Dict[str, torch.Tensor]:
    """The network's raw outputs (stride-4 ``pred``, ``rep``, ``aux``) under autocast ``amp``
    (None: full precision), half precision upcast to float32 for the losses."""
    with autocast(x.device.type, amp):
        out = net(x, raw=True)
    return {k: upcast(v) for k, v in out.items()}


@register
class U2PL(Method):
    """Student ``model`` and EMA teacher ``teacher`` (both in the checkpoint), one SGD
    ``optimizer`` over the student; the memory queues and the CutMix RNG in ``extra``."""

    name = "u2pl"
    streams = ("labeled", "unlabeled0")
    presets = BUILTIN_PRESETS["u2pl"]
    option_group = OPTIONS

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
        self.groups = ctx.groups
        self.sup_loss = SupervisedLoss(C, self.groups)
        self.amp = ctx.amp
        self.seed = int(C.seed)
        self.niters = int(ctx.niters_per_epoch)
        self.nepochs = int(C.nepochs)
        # identical on every rank (the reference seeds NumPy alike everywhere), so boxes and
        # the CutMix decision agree across processes and groups
        self.rng = np.random.RandomState(int(C.seed) % 2 ** 32)
        q, n, w, onehot = MODE_DEFAULTS.get(o.contrastive, MODE_DEFAULTS["reference"])
        self.num_queries = int(o.num_queries or q)
        self.num_negatives = int(o.num_negatives or n)
        self.union_onehot = (o.onehot or onehot) == "union"
        self.contrastive_weight, self.contra_log_weight = contrastive_weights(
            o.contrastive_weight if o.contrastive_weight is not None else w, self.groups.total)
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
        ema_update(self.teacher, self.student, min(1.0 - 1.0 / (k + 1), float(self.o.ema_decay)))

    # -- one iteration
    def train_step(self, batches, *, iteration, epoch, backward):
        lab, unl = batches
        self.epoch = epoch
        x_l, y_l = lab["data"], lab["label"]
        n = x_l.shape[0]
        self.student.train()
        if not self.teacher_active(epoch):
            out = _raw(self.student, x_l, self.amp)
            loss = self.sup_loss(out, y_l)
            self.teacher.train()
            with torch.no_grad():
                _raw(self.teacher, x_l, self.amp)    # only the teacher's BN statistics
            # the reference adds 0 x rep.sum() (spec 10.4): the representation head gets a
            # zero gradient, so SGD's weight decay and momentum still act on it
            backward((loss + 0 * out["rep"].sum()) if "rep" in out else loss)
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
            # one set of boxes, as every reference GPU draws the same; the partner is the
            # next image of the same group
            per_group = x_u.shape[0] // self.groups.per_process
            boxes = [half_box(self.rng, size[0], size[1]) for _ in range(per_group)]
            parts = [mix_with_next(boxes, x_u[sl], pseudo[sl])
                     for sl in self.groups.slices(x_u.shape[0])]
            x_u = torch.cat([p[0] for p in parts])
            pseudo = torch.cat([p[1] for p in parts])

        x_all = torch.cat([x_l, x_u])
        out = _raw(self.student, x_all, self.amp)
        sup = self.sup_loss(out, y_l)
        with torch.no_grad():
            t_out = _raw(self.teacher, x_all, self.amp)
            t_prob = torch.softmax(t_out["pred"], dim=1)            # stride 4
            # the reliability of both losses: entropy of the train-mode teacher's softmax
            h = entropy(torch.softmax(upsample(t_out["pred"][n:], size), dim=1))
        keep = keep_percent(float(self.o.drop_percent), epoch, self.nepochs)
        student_u = upsample(out["pred"][n:], size)
        # per reference group: its own entropy percentile, mean CE and kept fraction
        unsup_kept = [reliable_pseudo_label_loss(student_u[sl], pseudo[sl], keep, h[sl],
                                                 self.o.unsup_weight_mode, IGNORE)
                      for sl in self.groups.slices(x_u.shape[0])]
        unsup = float(self.o.unsup_weight) * torch.stack([u for u, _ in unsup_kept]).mean()
        kept = torch.stack([k for _, k in unsup_kept]).mean()
        terms = {"loss_sup": sup.detach(), "loss_unsup": unsup.detach(), "kept": kept,
                 "cutmix": torch.tensor(mixed, device=x_l.device)}
        loss = sup + unsup
        if self.o.contrastive != "off":
            contra = self._contrastive(out["rep"], t_out["rep"], t_prob, h, y_l, pseudo,
                                       epoch, iteration, terms)
            loss = loss + self.contrastive_weight * contra
            # logged as the reference prints it: the mean over groups of loss_weight x L_c,
            # without the 1/W its gradient carries
            terms["loss_contra"] = self.contra_log_weight * contra.detach()
        backward(loss)
        loss = loss.detach()
        terms["loss"] = terms["loss_sup"] + terms["loss_unsup"] + terms.get(
            "loss_contra", 0.0)
        extras = {"image": x_l, "label": y_l,
                  "logits": upsample(out["pred"][:n].detach(), y_l.shape[-2:])}
        return loss, terms, extras

    def _contrastive(self, rep, rep_t, t_prob, h, y_l, pseudo, epoch, iteration, terms):
        """The mean over this process's reference groups of each group's contrastive loss
        (spec 10.2): masks, one-hots and percentiles per group, every group's (and every
        rank's) keys pushed in global group order before any group samples."""
        o = self.o
        n = y_l.shape[0]
        C = t_prob.shape[1]
        small = rep.shape[-2:]
        alpha = unreliable_percent(float(o.low_entropy_threshold), epoch, self.nepochs)
        keep = keep_percent(float(o.drop_percent), epoch, self.nepochs)
        sl_l, sl_u = self.groups.slices(n), self.groups.slices(pseudo.shape[0])
        groups = []
        with torch.no_grad():
            for a, b in zip(sl_l, sl_u):
                valid = pseudo[b] != IGNORE
                low, high = entropy_masks(h[b], valid, alpha)
                if o.contrastive == "paper":
                    # anchors from every reliable pixel (H below the unsupervised loss's cut)
                    low = valid & ~entropy_masks(h[b], valid, 100.0 - keep)[1]
                masks = contrastive_masks(
                    label_onehot(downsample_labels(y_l[a], small), C, IGNORE,
                                 self.union_onehot),
                    label_onehot(downsample_labels(pseudo[b], small), C, IGNORE,
                                 self.union_onehot),
                    t_prob[:n][a], t_prob[n:][b],
                    downsample_labels(low.long(), small).bool(),
                    downsample_labels(high.long(), small).bool(),
                    mode=o.contrastive, low_rank=int(o.low_rank), high_rank=int(o.high_rank),
                    delta_p=float(o.delta_p), delta_n=float(o.delta_n))
                groups.append((a, b, masks, torch.cat([rep_t[:n][a], rep_t[n:][b]])))
            keys = [negative_keys(feats_t, masks) for _, _, masks, feats_t in groups]
            self.bank.push([torch.cat(per_class) for per_class in zip(*keys)])
        losses, valid_counts = [], []
        for g, (a, b, masks, feats_t) in zip(self.groups.indices, groups):
            loss, stats = contrastive_from_masks(
                torch.cat([rep[:n][a], rep[n:][b]]), feats_t, masks, self.bank,
                mode=o.contrastive, num_queries=self.num_queries,
                num_negatives=self.num_negatives, temperature=float(o.temperature),
                generator=draw_generator(self.seed, iteration, g))
            losses.append(loss)
            valid_counts.append(len(stats.valid_classes))
        dev = rep.device
        terms["valid_classes"] = torch.tensor(float(np.mean(valid_counts)), device=dev)
        terms["queue_mean"] = torch.tensor(float(np.mean(self.bank.lengths())), device=dev)
        return torch.stack(losses).mean()

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
    option_group = OPTIONS

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        self.net = ctx.prepare(u2pl_network_from_config(suponly_config(C)))
        self.modules = {"model": self.net}
        self.optimizers = {"optimizer": u2pl_sgd(self.net, C)}
        self.sup_loss = SupervisedLoss(C, ctx.groups)
        self.amp = ctx.amp

    def train_step(self, batches, *, iteration, epoch, backward):
        (lab,) = batches
        out = _raw(self.net, lab["data"], self.amp)
        loss = self.sup_loss(out, lab["label"])
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
