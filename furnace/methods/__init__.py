"""Segmentation methods trained by the one engine (see :mod:`furnace.methods.base`).

Built in: ``dueb`` (presets full, aleatoric, energy, cpcl) and ``supervised`` (one network,
labelled data only). Add one by subclassing :class:`Method` and decorating it with
:func:`register`; choose it with ``--set method=<name>`` or a script's ``method=``.

Names are imported on first use, so that ``furnace.methods.presets`` (used by ``--help`` and
``--print-config``) does not import torch.
"""
from .presets import method_name

_LAZY = {"STREAMS": "base", "Method": "base", "MethodContext": "base", "upcast": "base",
         "get_method": "registry", "method_names": "registry", "register": "registry"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STREAMS", "Method", "MethodContext", "upcast", "get_method", "method_name",
           "method_names", "register"]
