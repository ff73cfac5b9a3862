"""The method registry: ``method`` config key -> Method subclass."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Type

from ..config import ConfigError
from .base import Method
from .presets import method_name  # noqa: F401  (re-exported)

_REGISTRY: Dict[str, Type[Method]] = {}


def register(cls: Optional[Type[Method]] = None, *, name: Optional[str] = None,
             replace: bool = False) -> Callable:
    """Class decorator: ``@register`` (key ``cls.name``) or ``@register(name='x')``.

    Registering a taken name raises ValueError unless ``replace`` (tests, notebooks)."""
    def deco(c: Type[Method]) -> Type[Method]:
        key = name or c.name
        if not key:
            raise ValueError(f"{c.__name__}: set the class attribute `name` or pass name=")
        c.stream_specs()          # raises for streams it cannot build
        if key in _REGISTRY and _REGISTRY[key] is not c and not replace:
            raise ValueError(f"method '{key}' is already registered ({_REGISTRY[key].__name__})")
        c.name = key
        _REGISTRY[key] = c
        return c
    return deco(cls) if cls is not None else deco


def _builtins() -> None:
    """Register the built-in methods (imported on first need, they import torch)."""
    from . import dueb, eln, lpl, supervised, u2pl  # noqa: F401


def method_names() -> List[str]:
    _builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> Type[Method]:
    """The registered class for ``name``; ConfigError naming the known methods otherwise."""
    _builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"config key 'method' is {name!r}, which is not a registered method; "
                          f"known: {', '.join(method_names())}") from None
