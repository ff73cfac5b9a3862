"""ELN: a mean teacher whose pseudo labels an error-localisation network filters (Kwon & Kwak,
CVPR 2022; spec methods/ELN.md, faithful to its code kinux98/SSL_ELN).

One run, three stages (``C.eln``: ``pre_epoch`` and ``eln_epoch`` are the first epochs of
stages 2 and 3; :mod:`.eln_options`). One iteration, as the reference's ``train_both``, per
reference group (a reference GPU's batch: its own BatchNorm statistics, means, gates and
ELN weights; the process loss is the mean over its groups):

1. supervised CE of the student (dropout on) on the labelled batch, upsampled to the labels;
2. stage >= 2:
   a. the encoder again, without grad; each auxiliary decoder's CE on those detached
      features, added only while it is >= alpha_k x the supervised loss (a tie opens);
   b. the encoder a third time, without grad; the main decoder's prediction P0, then per
      auxiliary decoder its prediction P_k and the ELN's balanced BCE on it, then on P0;
3. stage 3: the student on the weak and the strong view (logits and embeddings at stride 4);
   the teacher (train-mode BN, no dropout, no grad) and then the ELN (likewise) on the weak
   view; pseudo labels = the teacher's argmax where the ELN logit is > 0; the CE on the
   strong then the weak view at stride 4; the pixel contrastive loss (teacher anchors,
   student keys) on 8 random 32 x 32 windows for the strong view, then 8 for the weak view;
4. loss = the sum of every term (all weights 1), one AdamW step (one GradScaler);
5. stage 3: the teacher's parameters follow the student's by EMA (0.995; BN buffers not).

At the start of stage 3 the teacher becomes a full copy of the student (buffers included);
at every later epoch start the student becomes a full copy of the teacher (``student_reset``,
AdamW's state kept). The teacher is in the checkpoint (the reference does not save it).

Validation (every ``eval_every`` epochs) follows the reference's cadence by default
(``val_cadence``: stage 1 after epochs e % 10 == 0, stage 2 e % 30 == 0, stage 3 always).

AdamW (weight decay on every group) with the reference's six groups: encoder (lr x 0.1),
decoder, ELN head, ELN backbone (lr x 0.1), auxiliary decoders 1 and 2; the main network's and
the auxiliary decoders' BatchNorm gamma/beta are left out (``train_bn_affine=False``, the
reference's SyncBN quirk); constant LR; ``zero_grad(set_to_none=False)`` as torch 1.11.

Not reproduced (the engine's behaviour instead): the partial last batches of the reference's
loaders (ours drop the last partial batch), its resume (it trains the saved epoch again;
ours continues exactly), its unlabelled loader opening ground-truth files, and the
reference's draws themselves (the windows come from a generator per iteration and group, the
jitter from each sample's seed).
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

from ..config import Config
from ..data.loader import StreamSpec
from ..data.strong import weak_strong_collate
from ..engine.lr import ConstantLR
from ..losses.eln import (draw_windows, eln_loss, eln_pseudo_labels, filtered_pseudo_ce,
                          gated_aux_loss, pixel_contrastive, sup_ce)
from ..models.eln import ELNDecoder, ELNSegNet, ErrorLocalizationNet
from ..models.network import norm_from_config
from ..precision import autocast
from ..resize import upsample
from .base import Method, MethodContext
from .common import ema_update
from .eln_options import OPTIONS  # C.eln: defaults, checks (torch-free)
from .groups import group_seed
from .presets import BUILTIN_PRESETS
from .registry import register


# -- pieces (tested on their own: spec 9.2 T6, T7) ------------------------------------------

@torch.no_grad()
def copy_state(dst: nn.Module, src: nn.Module) -> None:
    """dst <- src, parameters and buffers, in place (optimisers keep their references)."""
    dst.load_state_dict(src.state_dict())


def _params(module: nn.Module, with_bn: bool) -> List[nn.Parameter]:
    """The parameters of the Conv2d (and, if ``with_bn``, BatchNorm) modules of ``module``."""
    kinds = (nn.Conv2d, nn.modules.batchnorm._BatchNorm) if with_bn else (nn.Conv2d,)
    return [p for m in module.modules() if isinstance(m, kinds)
            for p in m.parameters(recurse=False)]


def freeze_bn_affine(module: nn.Module) -> None:
    """requires_grad=False on every BatchNorm gamma/beta (they are not optimised)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def eln_param_groups(student: ELNSegNet, eln: ErrorLocalizationNet,
                     auxes: List[ELNDecoder], lr: float, backbone_mult: float = 0.1,
                     train_bn_affine: bool = False) -> List[Dict[str, Any]]:
    """The reference's six AdamW groups (spec 4): encoder (lr x mult), decoder, ELN head, ELN
    backbone (lr x mult), then one per auxiliary decoder; main and auxiliary BN gamma/beta
    only with ``train_bn_affine`` (the ELN's always)."""
    bm = float(backbone_mult)
    groups = [dict(params=_params(student.encoder, train_bn_affine), lr_mult=bm,
                   name="encoder"),
              dict(params=_params(student.decoder, train_bn_affine), lr_mult=1.0,
                   name="decoder"),
              dict(params=[p for m in eln.head_modules() for p in _params(m, True)],
                   lr_mult=1.0, name="eln_head"),
              dict(params=_params(eln.backbone, True), lr_mult=bm, name="eln_backbone")]
    groups += [dict(params=_params(d, train_bn_affine), lr_mult=1.0, name=f"aux{k + 1}")
               for k, d in enumerate(auxes)]
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    return groups


def window_rng(seed: int, iteration: int, group: int) -> random.Random:
    """The contrastive windows' generator of one reference group at one iteration: a function
    of the seed, the iteration and the global group only (any launch, a resumed run)."""
    return random.Random(group_seed(seed, iteration, group))


def _t(x, device) -> torch.Tensor:
    """A 0-d float tensor of a term (the reference's terms may be Python numbers)."""
    if torch.is_tensor(x):
        return x.detach().float().reshape(())
    return torch.tensor(float(x), device=device)


STREAMS = (StreamSpec("labeled", "train", 0),
           StreamSpec("unlabeled", "unlabeled", 1, weak_strong_collate))


@register
class ELN(Method):
    """Modules ``model`` (student), ``teacher``, ``eln``, ``aux1``, ``aux2``; one AdamW
    ``optimizer``. BatchNorm per process (reference groups: per GPU of the reference)."""

    name = "eln"
    streams = STREAMS
    sync_batchnorm = False
    zero_grad_set_to_none = False
    presets = BUILTIN_PRESETS["eln"]
    option_group = OPTIONS

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        o = self.o = C.eln
        self.zero_grad_set_to_none = bool(o.zero_grad_set_to_none)
        self.pre_epoch, self.eln_epoch = int(o.pre_epoch), int(o.eln_epoch)
        self.alphas = [float(a) for a in o.aux_alphas]
        norm = norm_from_config(C)
        width, inner = int(C.get("backbone_width", 64)), int(C.head_channels)
        student = ELNSegNet(C.num_classes, C.backbone, width=width, inner=inner,
                            proj_dim=int(o.proj_dim), norm_layer=norm,
                            pretrained=C.pretrained_model, pretrained_strict=C.pretrained_strict)
        teacher = ELNSegNet(C.num_classes, C.backbone, width=width, inner=inner,
                            proj_dim=int(o.proj_dim), norm_layer=norm)
        teacher.load_state_dict(student.state_dict())      # a deep copy of the student
        ch = student.encoder.out_channels
        auxes = [ELNDecoder(C.num_classes, ch[0], ch[3], inner, int(o.proj_dim), norm)
                 for _ in self.alphas]
        eln = ErrorLocalizationNet(C.num_classes, width=width, inner=inner, norm_layer=norm,
                                   pretrained=o.eln_pretrained,
                                   load_shortcuts=bool(o.eln_load_shortcuts))
        if not o.train_bn_affine:
            for m in [student, teacher] + auxes:
                freeze_bn_affine(m)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.student = ctx.prepare(student)
        self.teacher = ctx.prepare(teacher)
        self.auxes = [ctx.prepare(d) for d in auxes]
        self.eln = ctx.prepare(eln)
        self.modules = {"model": self.student, "teacher": self.teacher, "eln": self.eln}
        self.modules.update({f"aux{k + 1}": d for k, d in enumerate(self.auxes)})
        groups = eln_param_groups(self.student, self.eln, self.auxes, float(C.lr),
                                  float(o.backbone_lr_mult), bool(o.train_bn_affine))
        self.optimizers = {"optimizer": torch.optim.AdamW(groups, lr=float(C.lr),
                                                          weight_decay=float(C.weight_decay))}
        self.groups = ctx.groups
        self.amp = ctx.amp
        self.seed = int(C.seed)
        self.epoch = 0
        self.synced_epoch = -1     # the last epoch whose start-of-epoch copy was done

    # -- schedule
    def stage(self, epoch: int) -> int:
        return 1 if epoch < self.pre_epoch else 2 if epoch < self.eln_epoch else 3

    def lr_schedules(self, total_iters: int, warmup_iters: int = 0) -> Dict[str, Any]:
        return {k: ConstantLR(self.C.lr) for k in self.optimizers}

    def on_epoch_start(self, epoch: int, *, resumed: bool) -> None:
        """Stage 3: teacher <- student at its first epoch, then student <- teacher at every
        epoch start (``student_reset``); once per epoch, also across a resume."""
        self.epoch = epoch
        if self.stage(epoch) < 3 or self.synced_epoch == epoch:
            return
        if epoch == self.eln_epoch:
            copy_state(self.teacher, self.student)
        elif self.o.student_reset:
            copy_state(self.student, self.teacher)
        self.synced_epoch = epoch

    def after_step(self, *, iteration: int, epoch: int) -> None:
        if self.stage(epoch) == 3:   # also after a step the scaler skipped, as the reference
            ema_update(self.teacher, self.student, float(self.o.ema_decay))

    # -- one iteration
    def train_step(self, batches, *, iteration, epoch, backward):
        lab, unl = batches
        self.epoch = epoch
        stage = self.stage(epoch)
        x_l, y_l = lab["data"], lab["label"]
        x_w, x_s = unl["data"], unl.get("strong")
        sl_l, sl_u = self.groups.slices(len(x_l)), self.groups.slices(len(x_w))
        G = len(sl_l)
        total: Dict[str, torch.Tensor] = {}
        self._logits = []
        for g, a, b in zip(self.groups.indices, sl_l, sl_u):
            loss, terms = self._group_step(x_l[a], y_l[a], x_w[b],
                                           x_s[b] if x_s is not None else None, stage,
                                           window_rng(self.seed, iteration, g))
            backward(loss / G)
            for k, v in terms.items():
                total[k] = total.get(k, 0) + _t(v, x_l.device) / G
        # upsampled once, after every backward: not held through the backward passes
        extras = {"image": x_l, "label": y_l,
                  "logits": upsample(torch.cat(self._logits).float(), y_l.shape[-2:])}
        return total["loss"], total, extras

    def _forward(self, net, x, **kw):
        with autocast(x.device.type, self.amp):
            return net(x, raw=True, **kw)

    def _group_step(self, x_l, y_l, x_w, x_s, stage, rng):
        """One reference GPU's iteration: (loss, terms)."""
        o, amp, dev = self.o, self.amp, x_l.device
        # 1. supervised
        logits, _ = self._forward(self.student, x_l, with_proj=False)
        sup = sup_ce(logits.float(), y_l)
        self._logits.append(logits.detach())
        loss, terms = sup, {"loss_sup": sup}
        if stage >= 2:
            with autocast(dev.type, amp):
                # 2a. auxiliary decoders on detached encoder features (encoder pass 2)
                with torch.no_grad():
                    high, low = self.student.features(x_l)
                aux_losses = [sup_ce(d(high, low, with_proj=False)[0].float(), y_l)
                              for d in self.auxes]
                aux, gates = gated_aux_loss(aux_losses, sup, self.alphas)
                # 2b. the ELN on the auxiliary decoders' and the main decoder's predictions
                # (encoder pass 3; dropout on everywhere)
                eln = 0
                with torch.no_grad():
                    high, low = self.student.features(x_l)
                    p0 = self.student.decoder(high, low, with_proj=False)[0]
                for d in self.auxes:
                    with torch.no_grad():
                        p = d(high, low, with_proj=False)[0]
                    eln = eln + self._eln_loss(x_l, p, y_l)
                eln = eln + self._eln_loss(x_l, p0, y_l)
            loss = loss + aux + eln
            terms.update(loss_aux=aux, loss_eln=eln)
            terms.update({f"gate{k + 1}": float(gt) for k, gt in enumerate(gates)})
        if stage == 3:
            # 3. self-training on the weak and strong views
            s_w, g_w = self._forward(self.student, x_w)
            s_s, g_s = self._forward(self.student, x_s)
            with torch.no_grad():
                s_t, g_t = self._forward(self.teacher, x_w, gt_mode=True)
                with autocast(dev.type, amp):
                    z_t = self.eln(x_w, s_t, gt_mode=True)
                pseudo, keep, argmax = eln_pseudo_labels(s_t, z_t)   # z_t's own dtype
            pl_s = filtered_pseudo_ce(s_s.float(), pseudo, o.empty_pseudo)
            pl_w = filtered_pseudo_ce(s_w.float(), pseudo, o.empty_pseudo)
            h, w = g_t.shape[-2:]
            size, count = int(o.window_size), int(o.windows)
            win_s = draw_windows(rng, h, w, size, count)
            win_w = draw_windows(rng, h, w, size, count)
            tau = float(o.temperature)
            con_s = pixel_contrastive(g_t.float(), g_s.float(), keep, argmax, win_s, tau, size)
            con_w = pixel_contrastive(g_t.float(), g_w.float(), keep, argmax, win_w, tau, size)
            loss = loss + pl_s + pl_w + con_s + con_w
            terms.update(loss_pl_s=pl_s, loss_pl_w=pl_w, loss_con_s=con_s, loss_con_w=con_w,
                         kept=keep.float().mean())
        terms["loss"] = loss
        return loss, terms

    def _eln_loss(self, x, pred, y):
        z = self.eln(x, pred)
        return eln_loss(z.float(), pred.float(), y, self.o.zero_errors,
                        bool(self.o.ignore_as_error))

    # -- evaluation, checkpoints, logs
    def validation_due(self, epoch: int) -> bool:
        """The reference validates after epoch e when e % 10 == 0 (stage 1), e % 30 == 0
        (stage 2, absolute epoch) or always (stage 3)."""
        if self.o.val_cadence != "reference":
            return True
        return epoch % {1: 10, 2: 30, 3: 1}[self.stage(epoch)] == 0

    def eval_models(self) -> Dict[str, nn.Module]:
        """The student; in stage 3 also the teacher (``eval_teacher``); nothing when the
        reference would not validate after this epoch (``val_cadence``)."""
        if not self.validation_due(self.epoch):
            return {}
        if self.stage(self.epoch) == 3 and self.o.eval_teacher:
            return {"model": self.student, "teacher": self.teacher}
        return {"model": self.student}

    @classmethod
    def eval_weights_key(cls, checkpoint: Mapping[str, Any]) -> str:
        """``model`` (the student) unless the run chose ``eln.eval_network=teacher`` and the
        checkpoint is from stage 3 (the file's ``eval_key``)."""
        extra = checkpoint.get("extra") or {}
        return str(extra.get("eval_key", "model"))

    @classmethod
    def build_eval_model(cls, C: Config) -> nn.Module:
        return ELNSegNet(C.num_classes, C.backbone, width=int(C.get("backbone_width", 64)),
                         inner=int(C.head_channels), proj_dim=int(C.eln.proj_dim),
                         norm_layer=norm_from_config(C))

    def extra_state(self) -> Dict[str, Any]:
        teacher = self.stage(self.epoch) == 3 and self.o.eval_network == "teacher"
        return {"epoch": int(self.epoch), "synced_epoch": int(self.synced_epoch),
                "eval_key": "teacher" if teacher else "model"}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.synced_epoch = int(state.get("synced_epoch", -1))

    def describe(self) -> str:
        o = self.o
        return (f"stages: 1 [0,{o.pre_epoch}) 2 [{o.pre_epoch},{o.eln_epoch}) 3 "
                f"[{o.eln_epoch},{self.C.nepochs}) ema={o.ema_decay} "
                f"student_reset={o.student_reset} alphas={list(o.aux_alphas)} "
                f"train_bn_affine={o.train_bn_affine} "
                f"zero_grad_set_to_none={o.zero_grad_set_to_none}")

    def log_line(self, values: Mapping[str, float]) -> str:
        parts = [f"loss={values['loss']:.3f} [sup={values['loss_sup']:.3f}"]
        for k, name in (("loss_aux", "aux"), ("loss_eln", "eln"), ("loss_pl_s", "pl_s"),
                        ("loss_pl_w", "pl_w"), ("loss_con_s", "con_s"),
                        ("loss_con_w", "con_w")):
            if k in values:
                parts.append(f"{name}={values[k]:.4f}")
        out = " ".join(parts) + "]"
        gates = [f"{values[k]:.2f}" for k in sorted(values) if k.startswith("gate")]
        if gates:
            out += " gates=" + "/".join(gates)
        if "kept" in values:
            out += f" kept={values['kept']:.3f}"
        return out
