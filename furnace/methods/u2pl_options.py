"""U2PL's options, the config group ``C.u2pl`` of the methods ``u2pl`` and ``u2pl_suponly``
(torch-free; the methods are :mod:`.u2pl`, spec methods/U2PL.md). Defaults are its VOC code's;
the presets (:mod:`.presets`) set the rest per experiment folder."""
from __future__ import annotations

from typing import Mapping

from ..config import Checks, Config, ConfigError
from .options import OptionGroup, register_options


def defaults() -> Config:
    return Config(
        sup_only_epoch=1,              # warm-start epochs: student only, teacher BN passes
        ema_decay=0.99,                # teacher = EMA of the student's parameters
        head_lr_mult=10.0,             # decoder (+ aux) lr = lr x this (Cityscapes code: 1)
        rep_head=True, rep_dim=256,    # representation head (SupOnly: no head)
        aux_weight=0.0,                # > 0: auxiliary head on layer3 (Cityscapes: 0.4)
        ohem_min_kept=100000,          # per reference group (GPU), as the reference (ohem)
        cutmix_prob=0.5,               # one draw per step: CutMix the whole batch or not
        drop_percent=80.0,             # percent of unlabelled pixels kept at epoch 0
        unsup_weight=1.0,              # eta
        unsup_weight_mode="reference",  # 'reference': x 1/kept-fraction; 'mean': plain mean
        contrastive="reference",       # 'reference' (the code), 'paper' (Eqs. 14-15), 'off'
        contrastive_weight=None,       # None: reference 1/reference_gpus, paper 0.1
        onehot=None,                   # None: reference 'union' (label_onehot), paper 'exact'
        low_entropy_threshold=20.0,    # alpha_0 (percent) of the anchor/negative masks
        low_rank=3, high_rank=20,      # negatives: the teacher ranks c in [low, high)
        delta_p=0.3, delta_n=1.0,      # anchor / negative probability thresholds
        num_queries=None,              # anchors per class; None: reference 256, paper 50
        num_negatives=None,            # keys per anchor; None: reference 50, paper 256
        temperature=0.5,
        queue_size_first=50000, queue_size=30000,  # class 0's queue and the others'
        save_queues=True,              # checkpoint the queues (the reference does not)
    )


def check(C: Config) -> None:
    """Values, then the combinations that would silently turn U2PL into another method."""
    v = Checks(C)
    v.integer("u2pl.sup_only_epoch", 0)
    v.integer("u2pl.rep_dim", 1)
    v.integer("u2pl.ohem_min_kept", 1)
    v.integer("u2pl.low_rank", 0)
    v.integer("u2pl.high_rank", 1)
    v.integer("u2pl.num_queries", 1, optional=True)
    v.integer("u2pl.num_negatives", 1, optional=True)
    v.integer("u2pl.queue_size_first", 1)
    v.integer("u2pl.queue_size", 1)
    v.number("u2pl.ema_decay", 0, 1)
    v.number("u2pl.head_lr_mult", 0, low_open=True)
    v.number("u2pl.aux_weight", 0)
    v.number("u2pl.cutmix_prob", 0, 1)
    v.number("u2pl.drop_percent", 0, 100, low_open=True)
    v.number("u2pl.unsup_weight", 0)
    v.number("u2pl.low_entropy_threshold", 0, 50)
    v.number("u2pl.temperature", 0, low_open=True)
    u = C.u2pl
    if u.get("contrastive_weight") is not None:
        v.number("u2pl.contrastive_weight", 0)
    v.one_of("u2pl.onehot", (None, "union", "exact"), "none, 'union' or 'exact'",
             "union: the reference's one-hot (image 0 holds the batch's labels)")
    v.one_of("u2pl.contrastive", ("reference", "paper", "off"))
    v.one_of("u2pl.unsup_weight_mode", ("reference", "mean"))
    _check_combinations(C, u)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_combinations(C: Config, u: Mapping) -> None:
    if C.get("method") == "u2pl" and _is_number(u.get("sup_only_epoch")) \
            and u["sup_only_epoch"] >= C.nepochs:
        raise ConfigError(
            f"config key 'u2pl.sup_only_epoch' is {u['sup_only_epoch']} but nepochs is "
            f"{C.nepochs}: no epoch would learn from unlabelled data, a supervised run "
            "logged as U2PL; lower u2pl.sup_only_epoch below nepochs (or train "
            "method=u2pl_suponly for the supervised baseline)")
    if str(C.get("method", "")).startswith("u2pl") and u.get("contrastive") != "off":
        low, high = u.get("low_rank"), u.get("high_rank")
        if _is_number(low) and _is_number(high) and low >= high:
            raise ConfigError(
                f"config keys 'u2pl.low_rank'={low} and 'u2pl.high_rank'={high}: negatives are "
                "the classes ranked in [low_rank, high_rank), an empty range; set low_rank < "
                "high_rank (U2PL: 3 and 20), or u2pl.contrastive=off")
        if _is_number(low) and low >= C.num_classes:
            raise ConfigError(
                f"config key 'u2pl.low_rank' is {low} but num_classes is {C.num_classes}: no "
                "class ranks that low, so no unlabelled pixel is a negative; set "
                "u2pl.low_rank < num_classes")


OPTIONS = register_options(OptionGroup(
    "u2pl", defaults, check,
    optional={"num_queries": int, "num_negatives": int, "contrastive_weight": float,
              "onehot": str}))
