"""The method protocol: what the training engine asks of a segmentation method.

A method owns its networks, optimisers and losses. The engine (``furnace.engine.trainer``)
owns everything around them: data streams, devices and DDP, AMP scaling, the LR schedule,
finiteness checks, logging, checkpoints, validation and preemption. It knows no method by
name; it calls, per run and per iteration:

    m = MethodClass(C, ctx)                  # build modules and optimisers (ctx: device, ...)
    m.stream_specs()                         # the loaders to build and draw each iteration
    m.lr_schedules(total, warmup)            # one LR schedule per optimiser (poly by default)
    m.on_epoch_start(e, resumed=...)         # after train_mode(), at every epoch's start
    loss, terms, extras = m.train_step(batches, iteration=t, epoch=e, backward=fn)
    (the engine sets each optimiser's LR, averages gradients across ranks and steps every
    optimiser in m.optimizers; zero_grad before the step as ``zero_grad_set_to_none`` says)
    m.after_step(iteration=t, epoch=e)       # e.g. an EMA teacher update
    m.eval_models()                          # validated by eval_every, best.pth per name
    m.extra_state() / m.load_extra_state(s)  # e.g. memory queues, an EMA step counter
    m.log_line(values)                       # the method's part of the train-log line

Checkpoints store ``{key: module.state_dict()}`` for ``m.modules`` and the same for
``m.optimizers``, so the keys a method chooses are the file's keys (DUEB: ``model``,
``optimizer_1``, ``optimizer_2``, as the reference).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..data.loader import DUEB_STREAMS, StreamSpec
from ..engine.lr import PolyLR
from ..precision import upcast  # noqa: F401  (the methods' import path)
from .groups import ReferenceGroups
from .options import OptionGroup

#: The streams a method may name instead of declaring its own (DUEB's), each a dict of device
#: tensors per iteration: ``labeled``: data [B,3,H,W] float, label [B,H,W] int64;
#: ``unlabeled0``: data, mask [B,1,H,W] in {0,1} (CutMix boxes); ``unlabeled1``: data (a
#: second, independent draw).
STREAMS = tuple(s.name for s in DUEB_STREAMS)

Batch = Dict[str, torch.Tensor]
StepResult = Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]


def _identity(module: nn.Module) -> nn.Module:
    return module


@dataclass
class MethodContext:
    """What a method needs from the engine to build itself.

    ``prepare(module)``: converts BatchNorm to SyncBN under DDP, moves the module to ``device``
    and makes every rank start from rank 0's weights; call it on each network before building
    its optimiser. ``amp``: the autocast dtype or None. ``batch_per_process``: images per
    stream per iteration on this process. ``groups``: the reference groups of that batch
    (:mod:`furnace.methods.groups`; default one group, the whole batch).
    """
    device: torch.device = torch.device("cpu")
    batch_per_process: int = 2
    amp: Optional[torch.dtype] = None
    rank: int = 0
    world_size: int = 1
    niters_per_epoch: int = 1
    groups: ReferenceGroups = field(default_factory=ReferenceGroups)
    prepare: Callable[[nn.Module], nn.Module] = field(default=_identity)


class Method:
    """Base class of the methods; subclasses set the class attributes and build in __init__.

    Class attributes:
        name: the registry key (the ``method`` config key).
        streams: the loaders used, in the order given to :meth:`train_step`: names of
            :data:`STREAMS` (DUEB's) or :class:`~furnace.data.StreamSpec` s of the method's
            own (list, seeds, collate); only these are loaded.
        sync_batchnorm: BatchNorm becomes SyncBatchNorm under DDP (False: per-process
            statistics, e.g. a reference whose BN was per GPU).
        zero_grad_set_to_none: how the engine clears gradients before each step.
        presets: ``{preset name: ['key=value', ...]}`` applied before the environment and
            ``--set`` (so the command line has the last word); scripts pick one.
        checkpoint_model_key: the ``modules`` key whose weights :meth:`build_eval_model`'s
            network loads in eval.py.
        option_group: the method's config group ``C.<name>``
            (:class:`~furnace.methods.options.OptionGroup`: defaults, checks, old names),
            declared torch-free beside the method and registered there (None: no options).
    Instances set ``modules`` (checkpoint key -> nn.Module) and ``optimizers`` (checkpoint key
    -> torch.optim.Optimizer).
    """

    name: ClassVar[str] = ""
    streams: ClassVar[Sequence[Union[str, StreamSpec]]] = ("labeled",)
    sync_batchnorm: ClassVar[bool] = True
    zero_grad_set_to_none: ClassVar[bool] = True
    presets: ClassVar[Mapping[str, Sequence[str]]] = {}
    checkpoint_model_key: ClassVar[str] = "model"
    option_group: ClassVar[Optional[OptionGroup]] = None

    def __init__(self, C, ctx: MethodContext):
        self.C = C
        self.ctx = ctx
        self.modules: Dict[str, nn.Module] = {}
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}

    # -- streams and schedules
    @classmethod
    def stream_specs(cls) -> List[StreamSpec]:
        """``streams`` as :class:`~furnace.data.StreamSpec` s (names: DUEB's streams)."""
        known = {s.name: s for s in DUEB_STREAMS}
        out = [s if isinstance(s, StreamSpec) else known.get(s) for s in cls.streams]
        if not out or None in out:
            raise ValueError(f"{cls.__name__}.streams must be a non-empty sequence of "
                             f"StreamSpec or names of {STREAMS}; got {tuple(cls.streams)}")
        return out

    def lr_schedules(self, total_iters: int, warmup_iters: int = 0) -> Dict[str, Any]:
        """One schedule per key of ``optimizers`` (an object with ``get_lr(t)``, t the global
        iteration); default: the reference's poly LR from ``C.lr`` for every optimiser. A
        parameter group's ``lr_mult`` scales its optimiser's LR."""
        return {k: PolyLR(self.C.lr, self.C.lr_power, total_iters, warmup_iters)
                for k in self.optimizers}

    def on_epoch_start(self, epoch: int, *, resumed: bool) -> None:
        """Called at the start of every epoch, after :meth:`train_mode`; ``resumed``: this is
        the first epoch of a run resumed from a checkpoint (possibly mid-epoch)."""

    # -- per iteration
    def train_step(self, batches: Sequence[Batch], *, iteration: int, epoch: int,
                   backward: Callable[[torch.Tensor], None]) -> StepResult:
        """One iteration's losses. ``batches``: one dict per entry of ``streams``.

        Call ``backward(part)`` on the loss (or on parts that add up to it, as soon as each is
        complete); the engine scales it for AMP. Return ``(loss, terms, extras)``: the detached
        total, a dict of 0-d tensors (must include ``loss``; every term is checked for
        finiteness and logged), and tensors for tensorboard images (``image`` [B,3,H,W],
        ``logits`` [B,C,H,W], optionally ``var`` [B,1,H,W]; may be empty).
        """
        raise NotImplementedError

    def after_step(self, *, iteration: int, epoch: int) -> None:
        """Called after every optimiser step (EMA updates, queue maintenance)."""

    def train_mode(self) -> None:
        """Put the trained networks in train mode at the start of each epoch."""
        for m in self.modules.values():
            m.train()

    # -- evaluation
    def eval_model(self) -> nn.Module:
        """The network to validate: in eval mode ``model(x)`` [B,3,H,W] -> logits [B,C,H,W]."""
        return self.modules[self.checkpoint_model_key]

    def eval_models(self) -> Dict[str, nn.Module]:
        """The networks validated during training, by name (default: :meth:`eval_model`
        alone, validated as ``best.pth``); with several, each has its log line and its
        ``best-<name>.pth``; an empty dict skips this epoch's validation."""
        return {self.checkpoint_model_key: self.eval_model()}

    @classmethod
    def build_eval_model(cls, C) -> nn.Module:
        """The evaluation network for eval.py, without pretrained weights; it loads the
        ``checkpoint_model_key`` entry of a checkpoint."""
        raise NotImplementedError

    @classmethod
    def eval_weights_key(cls, checkpoint: Mapping[str, Any]) -> str:
        """The checkpoint entry eval.py loads into :meth:`build_eval_model`'s network
        (default ``checkpoint_model_key``; a method may choose by the file's ``extra``)."""
        return cls.checkpoint_model_key

    # -- checkpoints and logs
    def extra_state(self) -> Dict[str, Any]:
        """Method state beyond modules and optimisers (tensors, numbers, strings, lists,
        dicts only: checkpoints load with ``weights_only=True``)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state` on resume."""

    def describe(self) -> str:
        """One line for the head of the train log (switches, options)."""
        return self.name

    def log_line(self, values: Mapping[str, float]) -> str:
        """The method's part of the per-iteration log line (after epoch, iteration and lr)."""
        ordered = (["loss"] if "loss" in values else []) + [k for k in values if k != "loss"]
        return " ".join(f"{k}={values[k]:.2f}" for k in ordered)
