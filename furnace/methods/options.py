"""Method option groups: each method's ``C.<name>`` defaults, checks and old key names.

A method keeps its options in one config group of its name (``C.dueb.*``, ``C.u2pl.*``),
declared beside it in a torch-free module (``dueb_options.py`` beside ``dueb.py``) as an
:class:`OptionGroup` passed to :func:`register_options`. :mod:`furnace.config` names no
method: :func:`~furnace.config.base_config` adds every registered group's defaults,
:func:`~furnace.config.validate` runs every group's ``check``, ``--set`` reads a group's
``optional`` types, and :class:`~furnace.config.Config` resolves the ``aliases`` (old
top-level names of a group's keys). So ``--help``, ``--print-config`` and config files need
no torch.

A method of one's own registers its group before ``base_config()`` runs (import its options
module from the experiment's config.py)::

    register_options(OptionGroup("mine", defaults=lambda: Config(weight=1.0), check=check))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from ..config import Config


@dataclass(frozen=True)
class OptionGroup:
    """One method's config group.

    ``name``: the group's key (``C.<name>``). ``defaults()``: a fresh Config of its keys and
    default values. ``check(C)``: raises :class:`~furnace.config.ConfigError` naming the key
    and the fix for a bad value or combination (``C`` is the whole finalised config; the
    helpers of :class:`furnace.config.Checks` help). ``aliases``: old top-level names -> the
    group's key each stands for, kept for config files, ``--set`` and the configs recorded in
    older checkpoints. ``optional``: group keys whose value may also be None -> the type they
    take otherwise (``int``, ``float``, ``str``), for parsing ``--set key=none``.
    """
    name: str
    defaults: Callable[[], Config]
    check: Optional[Callable[[Config], None]] = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    optional: Mapping[str, type] = field(default_factory=dict)


_GROUPS: Dict[str, OptionGroup] = {}
_ALIASES: Dict[str, Tuple[str, str]] = {}
_BUILTINS_LOADED = False


def register_options(group: OptionGroup, replace: bool = False) -> OptionGroup:
    """Register ``group``; a taken group name or old name is a ValueError unless ``replace``
    (the same group registered again, tests, notebooks)."""
    _builtins()
    old = _GROUPS.get(group.name)
    if old is not None and old is not group and not replace:
        raise ValueError(f"option group '{group.name}' is already registered")
    for alias in group.aliases:
        owner = _ALIASES.get(alias, (group.name,))[0]
        if owner != group.name and not replace:
            raise ValueError(f"old name '{alias}' of group '{group.name}' is already an old "
                             f"name of group '{owner}'")
        if alias in _GROUPS or alias == group.name:
            raise ValueError(f"old name '{alias}' of group '{group.name}' is a group's name")
    if old is not None:
        for alias in old.aliases:
            _ALIASES.pop(alias, None)
    _GROUPS[group.name] = group
    _ALIASES.update({alias: (group.name, key) for alias, key in group.aliases.items()})
    return group


def _builtins() -> None:
    """Register the built-in groups (torch-free modules; once: Config asks on every miss)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from . import dueb_options, eln_options, lpl_options, u2pl_options  # noqa: F401


def option_groups() -> List[OptionGroup]:
    """The registered groups, built-in ones first."""
    _builtins()
    return list(_GROUPS.values())


def aliases() -> Mapping[str, Tuple[str, str]]:
    """Every old top-level name -> (group, key in the group)."""
    _builtins()
    return _ALIASES
