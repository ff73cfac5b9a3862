"""The evaluation loop of one process: prediction over (a shard of) a list, which needs no
labels, and its scoring against them; and the validation a training run calls (below the
engine: no checkpoints, no logs, no CLI).

``furnace.eval.cli`` builds on it (checkpoints, devices, logs); the training engine calls
:func:`evaluate_model` with :func:`validation_config`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from furnace.data import build_eval_dataset
from furnace.data.image_labels import image_level_label

from .evaluator import Prediction, SegEvaluator
from .metrics import ConfusionMatrix, compute_metrics
from .uncertainty import UncertaintyMeter, format_uncertainty
from .visualize import get_palette, make_composite, safe_name, save_rgb


class EvalError(ValueError):
    """A problem with the evaluation request; the message says what to fix."""


def _identity(x):
    return x


def validation_config(C):
    """The config of validation during training: ``val_eval_mode`` (when set) replaces
    ``eval_mode`` (U2PL's Cityscapes code validates on the central crop)."""
    mode = C.get("val_eval_mode")
    if mode is None or mode == C.eval_mode:
        return C
    C = copy.deepcopy(C)
    C.eval_mode = mode
    return C


def predict_indices(model: torch.nn.Module, C, dataset, indices: Sequence[int], device: str,
                    channels_last: bool = True, with_var: bool = False,
                    uncertainty: bool = False, class_mask: Optional[bool] = None
                    ) -> Iterator[Tuple[dict, Prediction, SegEvaluator]]:
    """Predict ``dataset[i]`` for i in ``indices`` on ``device``; no label is needed (an
    export of pseudo labels predicts unlabelled images). Yields ``(item, prediction,
    evaluator)`` per image: the dataset's item (``data`` H x W x 3, ``fn``, ``label`` when
    the list has one), the :class:`~furnace.eval.evaluator.Prediction` and the evaluator
    (its ``eval_label`` / ``eval_image`` give the scored frame). ``channels_last`` converts
    the model in place (faster convolutions). ``class_mask`` (None: ``C.eval_class_mask``):
    restrict each image's argmax to the classes of its ground truth
    (:func:`image_level_label`); every item then needs a label."""
    if class_mask is None:
        class_mask = bool(C.get("eval_class_mask", False))
    dev = torch.device(device)
    model.to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    evaluator = SegEvaluator.from_config(model, C, device=dev, with_var=with_var,
                                         channels_last=channels_last, uncertainty=uncertainty)
    workers = int(C.get("num_workers", 0)) if dev.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, list(indices)),
                                         batch_size=None, collate_fn=_identity,
                                         num_workers=workers)
    for item in loader:
        classes = None
        if class_mask:
            if item.get("label") is None:
                raise EvalError(f"sample {item.get('fn')} has no label, but eval_class_mask "
                                f"restricts the prediction to the classes of its ground "
                                f"truth; use a list with labels or --set "
                                f"eval_class_mask=false")
            classes = image_level_label(item["label"], C.num_classes, item.get("fn", "")) > 0
        yield item, evaluator.predict(item["data"], classes), evaluator


def evaluate_indices(model: torch.nn.Module, C, dataset, indices: Sequence[int], device: str,
                     save_dir: Optional[Path] = None,
                     on_image: Optional[Callable[[torch.Tensor], None]] = None,
                     channels_last: bool = True,
                     uncertainty: Optional[UncertaintyMeter] = None) -> np.ndarray:
    """Score :func:`predict_indices` against the labels; returns the hist [C, C].

    ``save_dir``: write composites there. ``on_image(hist_of_image)`` is called after each
    image (the per-image histogram stays on the device). ``uncertainty``: a meter (on
    ``device``) that every image is added to (both branches then run).
    """
    dev = torch.device(device)
    cm = ConfusionMatrix(C.num_classes, dev, C.get("eval_absent_iou", "skip"))
    palette = get_palette(C.dataset, C.num_classes) if save_dir is not None else None
    for item, out, evaluator in predict_indices(model, C, dataset, indices, device,
                                                channels_last, save_dir is not None,
                                                uncertainty is not None):
        image, label = item["data"], item.get("label")
        if label is None:
            raise EvalError(f"sample {item.get('fn')} of {C.eval_source} has no label; "
                            "evaluation needs ground truth (use a list with labels)")
        if tuple(label.shape) != tuple(image.shape[:2]):
            raise EvalError(f"sample {item.get('fn')}: image {image.shape[:2]} and label "
                            f"{label.shape} differ in size")
        # eval_mode 'center_pad' scores a padded crop: the ground truth follows it
        label_t = evaluator.eval_label(torch.from_numpy(np.asarray(label)).to(dev))
        hist = cm.update(out.pred, label_t)
        if uncertainty is not None:
            pair = out.branch_logits
            uncertainty.update(out.logits, out.var, label_t,
                               None if pair is None else pair[1], pred=out.pred,
                               logits1=None if pair is None else pair[0])
        if save_dir is not None:
            comp = make_composite(evaluator.eval_image(image), out.pred.cpu().numpy(),
                                  label_t.cpu().numpy(), palette,
                                  None if out.var is None else out.var.cpu().numpy(),
                                  errors=True)
            save_rgb(save_dir / safe_name(item["fn"]), comp)
        if on_image is not None:
            on_image(hist)
    return cm.numpy()


def evaluate_model(model: torch.nn.Module, C, device: str = "cpu", dataset=None,
                   channels_last: bool = False, uncertainty: bool = False
                   ) -> Dict[str, object]:
    """Evaluate ``model`` (in eval mode, on ``device``) on C.eval_source in this process.

    For validation inside training: no checkpoint, no logs, the model's memory format is left
    alone unless ``channels_last``. Returns :func:`compute_metrics` of the histogram plus
    ``hist`` (int64 [C, C]); with ``uncertainty`` also ``uncertainty``
    (:meth:`UncertaintyMeter.compute`) and ``uncertainty_text`` (:func:`format_uncertainty`).
    """
    if dataset is None:
        dataset = build_eval_dataset(C)
    meter = UncertaintyMeter(C.num_classes, device) if uncertainty else None
    was_training = model.training
    try:
        hist = evaluate_indices(model, C, dataset, range(len(dataset)), device,
                                channels_last=channels_last, uncertainty=meter)
    finally:
        model.train(was_training)
    out = compute_metrics(hist, C.get("eval_absent_iou", "skip"))
    out["hist"] = hist
    if meter is not None:
        out["uncertainty"] = meter.compute()
        out["uncertainty_text"] = format_uncertainty(out["uncertainty"])
    return out


