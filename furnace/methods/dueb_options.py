"""DUEB's options, the config group ``C.dueb`` (torch-free; the method is :mod:`.dueb`).

Old names: DUEB's keys used to sit at the top level of the config. Those names stay aliases
of the group's keys for config files (``C.unsup_weight = 5.0``), ``--set unsup_weight=5``,
the environment and the configs recorded in older checkpoints; reading one gives the group's
value. ``--print-config`` and new checkpoints show the group only.

    old name           key
    unsup_weight       dueb.unsup_weight
    fuse_passes        dueb.fuse_passes
    supervised_only    dueb.supervised_only
    aleatoric.*        dueb.aleatoric.*
    energy.*           dueb.energy.*
"""
from __future__ import annotations

from ..config import Checks, Config
from .options import OptionGroup, register_options


def defaults() -> Config:
    return Config(
        # start_iter: global iteration from which the aleatoric terms are added (0: from the
        # first, as the reference). While the clean CE L0 is above about 1 (a network trained
        # from scratch, early on), the faithful A pushes L0 up (its gradient on L0 is
        # 1 + M - L0 * mean_t ELU'(d_t), negative there), so from-scratch runs start it later.
        aleatoric=Config(enabled=True, samples=10, learn_variance=False, per_pixel=False,
                         sup_weight=0.5, unsup_weight=1.0, start_iter=0),
        energy=Config(enabled=True, sup_weight=0.5, unsup_weight=1.0),
        unsup_weight=1.0,           # lambda: weight of the intersection/union pseudo-label CE
        # False: the reference's separate passes (sup, 4 teacher, 2 student); True: fewer,
        # batched passes (changes BatchNorm batch statistics)
        fuse_passes=False,
        supervised_only=False,      # legacy: True trains the supervised method instead
    )


def check(C: Config) -> None:
    v = Checks(C)
    v.integer("dueb.aleatoric.samples", 1)
    v.integer("dueb.aleatoric.start_iter", 0)
    v.number("dueb.unsup_weight", 0)
    for group in ("aleatoric", "energy"):
        for key in ("sup_weight", "unsup_weight"):
            v.number(f"dueb.{group}.{key}", 0)


#: old top-level names -> keys of C.dueb (the table above)
ALIASES = {"unsup_weight": "unsup_weight", "fuse_passes": "fuse_passes",
           "supervised_only": "supervised_only", "aleatoric": "aleatoric", "energy": "energy"}

OPTIONS = register_options(OptionGroup("dueb", defaults, check, aliases=ALIASES))
