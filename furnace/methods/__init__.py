"""Segmentation methods trained by the one engine (see :mod:`furnace.methods.base`).

Built in: ``dueb`` (presets full, aleatoric, energy, cpcl) and ``supervised`` (one network,
labelled data only). Add one by subclassing :class:`Method` and decorating it with
:func:`register`; choose it with ``--set method=<name>`` or a script's ``method=``.
"""
from .base import STREAMS, Method, MethodContext, upcast
from .registry import get_method, method_name, method_names, register
from . import dueb, supervised  # noqa: F401,E402  (registers the built-in methods)

__all__ = ["STREAMS", "Method", "MethodContext", "upcast", "get_method", "method_name",
           "method_names", "register"]
