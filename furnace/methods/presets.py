"""Torch-free facts about the built-in methods: their presets and the config's method name,
so that ``--help`` and ``--print-config`` answer without importing torch."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

from ..config import ConfigError


def _dueb(aleatoric: bool, energy: bool) -> List[str]:
    return [f"dueb.aleatoric.enabled={aleatoric}", f"dueb.energy.enabled={energy}",
            "supervised_only=False"]


#: method -> preset -> key=value strings (train.py, trainal.py, traine.py, traincpcl.py)
BUILTIN_PRESETS: Dict[str, Mapping[str, List[str]]] = {
    "dueb": {"full": _dueb(True, True), "aleatoric": _dueb(True, False),
             "energy": _dueb(False, True), "cpcl": _dueb(False, False)},
    "supervised": {},
}


def method_name(C) -> str:
    """The method a config asks for. The legacy switch ``supervised_only=True`` (kept for old
    configs and scripts) selects the ``supervised`` method when ``method`` is ``dueb``."""
    name = C.get("method", "dueb")
    if name == "dueb" and C.get("supervised_only"):
        return "supervised"
    return name


def presets_of(method: str) -> Mapping[str, List[str]]:
    """The presets of ``method`` (built-in ones without importing torch)."""
    if method in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[method]
    from .registry import get_method
    return get_method(method).presets


#: what a script that names no method trains (the older ``train_main(HERE)``), and the method
#: of checkpoints without a ``method`` key (the reference's and our format 1)
DEFAULT_SCRIPT = ("dueb", "full")
FORMAT1_METHOD = "dueb"


def script_overrides(method: Optional[str], preset: Optional[str],
                     aleatoric: Optional[bool] = None, energy: Optional[bool] = None,
                     supervised_only: Optional[bool] = None) -> List[str]:
    """The key=value strings a train script applies before the environment and --set.

    ``method``/``preset``: a registered method and one of its presets. The switches of older
    scripts (``aleatoric=``, ``energy=``, ``supervised_only=``) still work: they imply DUEB
    and set its keys."""
    if method is None and preset is None and aleatoric is None and energy is None:
        method, preset = DEFAULT_SCRIPT if not supervised_only else ("supervised", None)
    elif method is None:
        method = "dueb"
    out = [f"method={method}"]
    if preset is not None:
        presets = presets_of(method)
        if preset not in presets:
            raise ConfigError(f"method '{method}' has no preset '{preset}'; known: "
                              f"{', '.join(sorted(presets)) or 'none'}")
        out += list(presets[preset])
    if aleatoric is not None:
        out.append(f"dueb.aleatoric.enabled={aleatoric}")
    if energy is not None:
        out.append(f"dueb.energy.enabled={energy}")
    if supervised_only is not None:
        out.append(f"supervised_only={supervised_only}")
    elif method == "dueb" and "supervised_only=False" not in out:
        out.append("supervised_only=False")    # as the older scripts: the script decides
    return out
