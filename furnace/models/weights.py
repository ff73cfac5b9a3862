"""Loading pretrained backbone weights from a local file (nothing is ever downloaded).

Accepted files (``torch.save`` of a dict of tensors):

* reference "v1c" files such as ``resnet50_v1c.pth`` (deep stem, keys ``conv1.0.weight``,
  ``bn1.weight``, ``layer1.0.conv1.weight``, ...), optionally wrapped as ``{'model': ...}`` or
  ``{'state_dict': ...}`` and optionally with ``module.`` prefixes (DataParallel);
* torchvision ResNet state dicts, which fit a backbone built with ``stem='classic'``.

``fc.*`` keys (the ImageNet classifier) are ignored. Unlike the reference, which loads with
``strict=False`` and reports nothing, every load is logged (logger ``furnace.models``), and a
file that does not fit raises a ``ValueError`` naming the file and the offending keys.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Union

import torch
from torch import nn

__all__ = ["load_backbone_weights", "LoadResult", "WEIGHTS_DIR"]

logger = logging.getLogger("furnace.models")

WEIGHTS_DIR = "DATA/pytorch-weight/"
_SHOW = 5  # how many keys an error or log message lists


@dataclass
class LoadResult:
    """Outcome of :func:`load_backbone_weights` (key names as in the backbone's state_dict)."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)


def _preview(keys: List[str]) -> str:
    more = f", ... ({len(keys)} in total)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _extract_state_dict(obj: object, path: Path) -> Dict[str, torch.Tensor]:
    """Unwrap ``{'model': sd}`` / ``{'state_dict': sd}``, strip ``module.``, drop ``fc.*``."""
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"backbone weights file '{path}' holds a {type(obj).__name__}, "
                         "expected a state dict (a dict of tensors)")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("fc."):
            continue
        state[key] = value
    return state


def load_backbone_weights(backbone: nn.Module, path: Union[str, os.PathLike],
                          strict: bool = True) -> LoadResult:
    """Copy the weights stored in ``path`` into ``backbone`` (in place, any dtype/device).

    Args:
        backbone: a :class:`~furnace.models.resnet.ResNet` (or any module).
        path: local ``.pth`` file, e.g. ``DATA/pytorch-weight/resnet50_v1c.pth``.
        strict: if True, every backbone tensor except ``num_batches_tracked`` must be in the
            file. If False, a partial match is accepted and the missing keys are logged.
            Keys of the file that the backbone lacks (e.g. loading ResNet-101 weights into a
            ResNet-50, as the reference VOC config does) are logged in both modes.

    Returns:
        A :class:`LoadResult` with the loaded, missing and unexpected keys.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read, a shared key has a different shape, no key
            matches at all, or (strict) backbone keys are missing from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained backbone weights not found: '{path}'. Put the file in {WEIGHTS_DIR} "
            f"(e.g. {WEIGHTS_DIR}resnet50_v1c.pth or resnet101_v1c.pth) and point "
            "pretrained_model at it, or set pretrained_model=None to train from scratch.")
    try:
        # weights_only: a weights file must not be able to run code when loaded.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read backbone weights file '{path}': {exc}") from exc
    state = _extract_state_dict(obj, path)

    expected = backbone.state_dict()
    loaded = [k for k in expected if k in state]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]

    mismatched = [k for k in loaded if state[k].shape != expected[k].shape]
    if mismatched:
        details = "; ".join(f"{k}: file {list(state[k].shape)} vs model "
                            f"{list(expected[k].shape)}" for k in mismatched[:_SHOW])
        raise ValueError(
            f"backbone weights file '{path}' does not fit the model: {len(mismatched)} "
            f"tensor(s) differ in shape ({details}). Check the backbone depth and stem "
            "('deep' for *_v1c.pth files, 'classic' for torchvision files).")
    if not loaded:
        raise ValueError(
            f"backbone weights file '{path}' shares no key with the model: the file has "
            f"{_preview(sorted(state))}; the model expects {_preview(list(expected))}. "
            "Check the backbone and stem ('deep' for *_v1c.pth files, 'classic' for "
            "torchvision files).")
    # Old v1c files predate num_batches_tracked; its value does not affect the forward pass.
    required_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if strict and required_missing:
        raise ValueError(
            f"backbone weights file '{path}' lacks {len(required_missing)} tensor(s) of the "
            f"model: {_preview(required_missing)}. Use pretrained_strict=False to accept a "
            "partial match (the rest keeps its random init).")

    backbone.load_state_dict({k: state[k] for k in loaded}, strict=False)

    logger.info("loaded %d/%d backbone tensors from %s", len(loaded), len(expected), path)
    if required_missing:
        logger.warning("%d backbone tensor(s) not in %s keep their random init: %s",
                       len(required_missing), path, _preview(required_missing))
    if unexpected:
        logger.info("%d tensor(s) of %s are not used by this backbone: %s",
                    len(unexpected), path, _preview(unexpected))
    return LoadResult(loaded=loaded, missing=missing, unexpected=unexpected)
