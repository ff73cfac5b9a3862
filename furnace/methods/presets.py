"""Torch-free facts about the built-in methods: their presets and the config's method name,
so that ``--help`` and ``--print-config`` answer without importing torch."""
from __future__ import annotations

from typing import Dict, List, Mapping


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
