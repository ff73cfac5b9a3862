"""ELN's options, the config group ``C.eln`` of the method ``eln`` (torch-free; the method is
:mod:`.eln`, spec methods/ELN.md). Defaults are the reference's VOC README run; each quirk
of the spec's sections 8 and 10 is kept by default and named here as a switch.

Stages (epochs counted from 0; one run, ``nepochs`` in total):

* stage 1, epochs [0, pre_epoch): supervised training of the student;
* stage 2, epochs [pre_epoch, eln_epoch): + the gated auxiliary decoders and the ELN;
* stage 3, epochs [eln_epoch, nepochs): + ELN-filtered pseudo labels and the contrastive
  loss with the EMA teacher.

``eln_epoch`` is the *first epoch of stage 3* (the reference's ``warm_up`` =
``--pre_epoch + --eln_epoch``, whose ``--eln_epoch`` is the length of stage 2): VOC's README
run (pre 70, ELN 50) is ``pre_epoch=70, eln_epoch=120``.
"""
from __future__ import annotations

import math

from ..config import Checks, Config, ConfigError
from .options import OptionGroup, register_options


def defaults() -> Config:
    return Config(
        pre_epoch=70,                  # first epoch of stage 2 (aux decoders + ELN)
        eln_epoch=120,                 # first epoch of stage 3 (reference: pre + eln epochs)
        ema_decay=0.995,               # teacher = EMA of the student's parameters (stage 3)
        student_reset=True,            # stage 3: student <- teacher at every epoch start
        aux_alphas=[20.0, 50.0],       # the auxiliary decoders' gates (one decoder each)
        temperature=0.5,               # contrastive tau
        # the strong view: ColorJitter(brightness, contrast, saturation, hue), then grayscale
        strong_jitter=[0.4, 0.4, 0.4, 0.1], strong_gray_p=0.2,
        windows=8, window_size=32,     # contrastive windows per view, side at stride 4
        proj_dim=128,                  # projection-head channels
        backbone_lr_mult=0.1,          # main encoder and ELN backbone lr = lr x this
        train_bn_affine=False,         # False: main/aux BN gamma/beta not optimised (ref.)
        zero_grad_set_to_none=False,   # False: torch 1.11's zero_grad (soft aux gate, ref.)
        ignore_as_error=True,          # ELN target: label 255 counts as an error (ref.)
        zero_errors="raise",           # ELN batch without error pixel: 'raise' (ref.), 'unit'
        empty_pseudo="nan",            # no kept pseudo label: 'nan' (ref.: stops), 'zero'
        eln_pretrained=None,           # torchvision resnet34 file for the ELN backbone
        eln_load_shortcuts=False,      # True: also load layerN.0 shortcuts (ref.: random)
        eval_teacher=True,             # stage 3: validate the teacher beside the student
        eval_network="student",        # what eval.py evaluates of a stage-3 checkpoint
        # validation after epoch e (every eval_every): 'reference' only when the reference
        # validates (stage 1: e % 10 == 0, stage 2: e % 30 == 0, stage 3: every epoch), 'all'
        val_cadence="reference",
    )


def stride4(n: int) -> int:
    """Side of the stride-4 map of an n-pixel input (classic stem, floor pools)."""
    return math.ceil(math.ceil(n / 2) / 2)


def check(C: Config) -> None:
    v = Checks(C)
    v.integer("eln.pre_epoch", 0)
    v.integer("eln.eln_epoch", 1)
    v.integer("eln.windows", 1)
    v.integer("eln.window_size", 1)
    v.integer("eln.proj_dim", 1)
    v.number("eln.ema_decay", 0, 1)
    v.number("eln.temperature", 0, low_open=True)
    v.number("eln.backbone_lr_mult", 0)
    v.number("eln.strong_gray_p", 0, 1)
    jitter = C.eln.get("strong_jitter")
    if not isinstance(jitter, (list, tuple)) or len(jitter) != 4 or not all(
            isinstance(j, (int, float)) and not isinstance(j, bool) and j >= 0
            for j in jitter) or jitter[3] > 0.5:
        raise ConfigError(f"config key 'eln.strong_jitter' must be 4 numbers >= 0 (brightness, "
                          f"contrast, saturation, hue <= 0.5; reference [0.4, 0.4, 0.4, 0.1]), "
                          f"got {jitter!r}")
    v.one_of("eln.zero_errors", ("raise", "unit"))
    v.one_of("eln.empty_pseudo", ("nan", "zero"))
    v.one_of("eln.eval_network", ("student", "teacher"))
    v.one_of("eln.val_cadence", ("reference", "all"))
    for key in ("student_reset", "train_bn_affine", "zero_grad_set_to_none",
                "ignore_as_error", "eln_load_shortcuts", "eval_teacher"):
        v.one_of(f"eln.{key}", (True, False), "True or False")
    e = C.eln
    alphas = e.get("aux_alphas")
    if not isinstance(alphas, (list, tuple)) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and a >= 0
            for a in alphas):
        raise ConfigError(f"config key 'eln.aux_alphas' must be a list of numbers >= 0 (one "
                          f"auxiliary decoder each; reference [20, 50]), got {alphas!r}")
    if C.get("method") != "eln":
        return
    pre, eln = e["pre_epoch"], e["eln_epoch"]
    if eln <= pre:
        raise ConfigError(
            f"config keys 'eln.pre_epoch'={pre} and 'eln.eln_epoch'={eln}: eln_epoch is the "
            "first epoch of stage 3 and must be > pre_epoch (stage 2 trains the ELN before "
            "it filters pseudo labels); for the reference's --pre_epoch P --eln_epoch E set "
            "eln.pre_epoch=P eln.eln_epoch=P+E")
    if eln >= C.nepochs:
        raise ConfigError(
            f"config key 'eln.eln_epoch' is {eln} but nepochs is {C.nepochs}: stage 3 (self-"
            "training) would never run, a supervised run logged as ELN; set "
            "eln.eln_epoch < nepochs")
    h = stride4(int(C.image_height))
    w = stride4(int(C.image_width))
    if e["window_size"] > min(h, w):
        raise ConfigError(
            f"config key 'eln.window_size' is {e['window_size']} but the stride-4 feature map "
            f"of a {C.image_height}x{C.image_width} crop is {h}x{w}: the contrastive windows "
            "do not fit; lower eln.window_size or raise image_height/image_width")


OPTIONS = register_options(OptionGroup("eln", defaults, check,
                                       optional={"eln_pretrained": str}))
