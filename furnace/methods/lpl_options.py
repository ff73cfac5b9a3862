"""LPL's options, the config group ``C.lpl`` of the methods ``lpl`` (stage 1: HybridNet and
PseudoNet) and ``lpl_retrain`` (stage 2: one network on exported pseudo labels); torch-free
(the methods are :mod:`.lpl`, spec methods/LPL.md). Defaults are the reference's run.py;
each quirk of the spec's section 9 that changes the numbers is kept by default and named
here as a switch.
"""
from __future__ import annotations

from ..config import Checks, Config, ConfigError
from .options import OptionGroup, register_options


def defaults() -> Config:
    return Config(
        gamma=8.0,                     # PCT admission weight = (min running IoU) ** gamma
        augtime=2,                     # K: ops per strong sample (k colour, K - k geometric)
        score_momentum=0.99,           # decay of the IoU tracker's counts per iteration
        lr_mults=[1.0, 1.0, 10.0],     # backbone, head, cls_conv lr multipliers
        pseudonet_poly=False,          # False: PseudoNet's lr stays constant (reference)
        gt_replace=True,               # labelled images in the weak half: pseudo label = GT
        stable_cce=False,              # True: max-subtracted, epsilon-free CCE (not ref.)
        validate="both",               # stage-1 validation: 'both' networks, 'hybrid', 'none'
        eval_network="hybrid",         # what eval.py and the export read of a stage-1 file
        shuffle=False,                 # retrain: False = one fixed order every epoch (ref.)
    )


def check(C: Config) -> None:
    v = Checks(C)
    v.number("lpl.gamma", 0, low_open=True)
    v.integer("lpl.augtime", 0)
    v.number("lpl.score_momentum", 0, 1)
    for key in ("pseudonet_poly", "gt_replace", "stable_cce", "shuffle"):
        v.one_of(f"lpl.{key}", (True, False), "True or False")
    v.one_of("lpl.validate", ("both", "hybrid", "none"))
    v.one_of("lpl.eval_network", ("hybrid", "pseudo"))
    mults = C.lpl.get("lr_mults")
    if not isinstance(mults, (list, tuple)) or len(mults) != 3 or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and m >= 0 for m in mults):
        raise ConfigError(f"config key 'lpl.lr_mults' must be three numbers >= 0 (backbone, "
                          f"head, cls_conv; reference [1, 1, 10]), got {mults!r}")
    if C.get("method") == "lpl" and C.get("image_labels") is None:
        raise ConfigError("config key 'image_labels' is None but method 'lpl' trains on "
                          "image-level labels; set image_labels=masks (derived from the label "
                          "PNGs) or the path of an image-label list")


OPTIONS = register_options(OptionGroup("lpl", defaults, check))
