"""Inference for one image: sliding windows, scales and flip, as the reference (REFERENCE 5.3).

The numbers follow the reference ``Evaluator.sliding_eval`` / ``scale_process`` exactly:

* single pass when the long side fits the crop: normalise, pad to ``crop x crop`` with 0
  *after* normalisation (centred, top = pad // 2), one forward, crop the margins off;
* otherwise pad the *raw uint8* image with 0 to at least ``crop x crop``, visit a grid of
  ``crop x crop`` windows with stride ``ceil(crop * stride_rate)`` (the last window flush with
  the edge), add the raw window logits into a float32 accumulator (no division by the overlap
  count: QUIRK 31), crop the outer padding off;
* per scale: resize the image (cv2 bilinear, uint8), and the score back to the original size
  (cv2 bilinear, float32); scores of all scales are summed in float64; prediction = argmax.

What differs from the reference is speed only: normalisation and padding run in torch on the
device, the windows of an image go through the network in batches of ``batch_windows``, only
the evaluated branch is computed (QUIRK 9), and CUDA runs under bf16 autocast by default.

Options for U2PL's protocols (docs: U2PL spec 5.4, 5.5), off by default:

* ``average='logits'``: divide the summed window logits by the number of passes per pixel
  (U2PL's Cityscapes ``eval.py``: sliding 769, stride 513, logits averaged). The argmax of one
  scale is unchanged; the score and a multi-scale sum are not.
* ``mode='center_pad'``: U2PL's VOC validation. Each image is padded (floor(pad/2) top/left,
  0 after normalisation) and centre-cropped to ``crop x crop``, one forward, and the
  prediction covers that crop; :meth:`SegEvaluator.eval_label` maps the ground truth to the same
  frame, its padding set to ``label_pad`` (U2PL: 0, counted as background; 255 leaves it out).
* ``mode='resize'``: ELN's VOC validation. Each image is resized to ``crop x crop`` (bilinear,
  align_corners=False, ignoring the aspect ratio), one forward, and the ground truth is
  resized to the same frame (nearest): the score is against the resized labels.

Options for LPL's test protocol (docs: LPL spec 4.1, 4.4), off by default:

* ``resize='normalized_cubic'``: each scale is made from the *normalised* float32 image with
  OpenCV bicubic (``cv2.resize`` fx = fy = s, so the size OpenCV computes: rounded half to
  even), and each scale's output is resized back with bilinear align_corners=True (instead of
  cv2 bilinear of the uint8 image and of the scores). With ``mode='whole'`` and
  ``average='logits'`` the score is the mean of every pass's logits times the number of scales.
* ``crf=True``: DenseCRF (:mod:`furnace.eval.crf`) on the softmax of the averaged logits,
  over the de-normalised image (:func:`furnace.eval.crf.crf_image`); prediction = argmax Q.
* :meth:`SegEvaluator.predict` ``classes``: the argmax only over the given classes (the
  image-level labels of stage-1 evaluation and pseudo-label export).

Networks that return logits smaller than their input (U2PL's decoder, stride 4) are upsampled
to the input bilinearly with align_corners=True, as U2PL does; full-size logits are untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..precision import amp_dtype, autocast
from ..resize import upsample as _upsample

Window = Tuple[int, int, int, int]

MODES = ("slide", "whole", "center_pad", "resize")
FRAMED = ("center_pad", "resize")   # modes whose prediction is in the crop's frame
AVERAGES = ("sum", "logits")
RESIZES = ("image", "normalized_cubic")


def scaled_size(h: int, w: int, scale: float) -> Tuple[int, int]:
    """(h', w') of ``cv2.resize(img, None, fx=scale, fy=scale)``: OpenCV rounds the product
    half to even (17 x 0.5 -> 8, 21 x 1.5 -> 32, 27 x 1.5 -> 40), at least 1 pixel."""
    return max(1, int(np.rint(h * scale))), max(1, int(np.rint(w * scale)))


def restricted_argmax(score: torch.Tensor, classes) -> torch.Tensor:
    """Argmax over dim 0 of ``score`` [C, H, W] among the classes with ``classes[c]`` true
    (bool or 0/1, [C]); ties go to the lowest class index. int64 [H, W]."""
    keep = torch.as_tensor(np.asarray(classes) if not isinstance(classes, torch.Tensor)
                           else classes, device=score.device)
    if keep.dim() != 1 or keep.numel() != score.shape[0]:
        raise ValueError(f"classes must be a vector of {score.shape[0]} flags, got shape "
                         f"{tuple(keep.shape)}")
    keep = keep.bool()
    if not bool(keep.any()):
        raise ValueError("classes marks no class present; the restricted argmax needs one")
    low = torch.finfo(score.dtype).min if score.is_floating_point() else -(2 ** 62)
    return score.masked_fill(~keep[:, None, None], low).argmax(0)


# ----------------------------------------------------------------------------- window grid

@dataclass(frozen=True)
class WindowGrid:
    """Where the windows of one image lie (all coordinates in pixels).

    mode: ``'single'`` (long side <= crop: one window, image padded after normalisation) or
        ``'sliding'`` (image padded raw, then a grid of windows).
    image_hw: (H, W) of the image at this scale.
    crop: window side.
    stride: window step, ``ceil(crop * stride_rate)`` (None in single mode).
    margin: (top, bottom, left, right) padding added around the image.
    padded_hw: (PH, PW) size after padding.
    grid: (rows, cols) of the window grid ((1, 1) in single mode).
    windows: (y0, y1, x0, x1) per window in the padded frame, row-major visiting order.
    crop_back: (y0, y1, x0, x1) region of the padded frame that is the image.
    """
    mode: str
    image_hw: Tuple[int, int]
    crop: int
    stride: Optional[int]
    margin: Tuple[int, int, int, int]
    padded_hw: Tuple[int, int]
    grid: Tuple[int, int]
    windows: Tuple[Window, ...]
    crop_back: Window


def _centred_margin(size: int, target: int) -> Tuple[int, int]:
    pad = max(target - size, 0)
    return pad // 2, pad // 2 + pad % 2


def sliding_windows(h: int, w: int, crop: int, stride_rate: float = 2 / 3) -> WindowGrid:
    """The window grid of an ``h x w`` image for window side ``crop`` (REFERENCE 5.3).

    Pure function of the sizes; see :class:`WindowGrid` for the fields. Matches the
    coordinates recorded from the reference (tests/golden/sliding_grid.json).
    """
    if h < 1 or w < 1 or crop < 1:
        raise ValueError(f"bad sizes for the sliding window: image {h}x{w}, crop {crop}")
    top, bottom = _centred_margin(h, crop)
    left, right = _centred_margin(w, crop)
    ph, pw = h + top + bottom, w + left + right
    crop_back = (top, ph - bottom, left, pw - right)
    if max(h, w) <= crop:
        return WindowGrid("single", (h, w), crop, None, (top, bottom, left, right), (ph, pw),
                          (1, 1), ((0, crop, 0, crop),), crop_back)
    stride = int(math.ceil(crop * stride_rate))
    if stride < 1:
        raise ValueError(f"eval_stride_rate {stride_rate} gives a stride < 1 for crop {crop}")
    rows = int(math.ceil((ph - crop) / stride)) + 1
    cols = int(math.ceil((pw - crop) / stride)) + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y1 = min(r * stride + crop, ph)
            x1 = min(c * stride + crop, pw)
            windows.append((y1 - crop, y1, x1 - crop, x1))
    return WindowGrid("sliding", (h, w), crop, stride, (top, bottom, left, right), (ph, pw),
                      (rows, cols), tuple(windows), crop_back)


def center_pad_crop(t: torch.Tensor, crop: int, fill: float) -> torch.Tensor:
    """``t`` [..., H, W] padded to at least ``crop`` per side with ``fill`` (floor(pad/2)
    before, the rest after), then centre-cropped (offset (size - crop) // 2) to
    [..., crop, crop]: U2PL's ``Crop(crop_type='center')``."""
    h, w = int(t.shape[-2]), int(t.shape[-1])
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        padded = t.new_full(tuple(t.shape[:-2]) + (h + ph, w + pw), fill)
        padded[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w] = t
        t = padded
    y0, x0 = (t.shape[-2] - crop) // 2, (t.shape[-1] - crop) // 2
    return t[..., y0:y0 + crop, x0:x0 + crop]


# ----------------------------------------------------------------------------- normalisation

def normalization_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Lookup table [3, 256] float32: the normalised value of each uint8 level per channel.

    Computed exactly as the reference does per pixel: ``float32(v) / 255`` in float32, then
    ``(x - mean) / std`` in float64 (NumPy promotion), then cast to float32 when fed to the
    network. A table makes the device-side normalisation bit-identical to that.
    """
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(-1, 1)
    if mean.shape[0] != 3 or std.shape[0] != 3:
        raise ValueError(f"image_mean and image_std need 3 values (RGB), got {mean.ravel()} "
                         f"and {std.ravel()}")
    return ((levels.astype(np.float64)[None, :] - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------- evaluator

@dataclass
class Prediction:
    """Result of :meth:`SegEvaluator.predict` for one ``H x W`` image (tensors on the device).

    pred: int64 [H, W], the argmax class (modes 'center_pad', 'resize': [crop, crop], the
        frame of :meth:`SegEvaluator.eval_label`).
    score: [C, H, W] summed window logits over scales (float32 for one scale, float64 for
        several, as the reference's accumulator); with ``average='logits'`` each scale's
        windows (and flips) are averaged instead of summed.
    var: float32 [H, W] variance map of the evaluated branch averaged over windows (and flips
        and scales), or None when not requested or the model has no variance head.
    logits: float32 [C, H, W] logits averaged over windows, flips and scales (the summed
        ``score`` over-counts overlaps, QUIRK 31, which would sharpen the softmax), or None
        unless the evaluator runs with ``uncertainty``.
    branch_logits: float32 [2, C, H, W] the same average for branch 1 and branch 2 of a dual
        network (``uncertainty`` only, else None).
    """
    pred: torch.Tensor
    score: torch.Tensor
    var: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    branch_logits: Optional[torch.Tensor] = None


class SegEvaluator:
    """Evaluates a segmentation network on single RGB uint8 images (REFERENCE 5.3).

    model: in eval mode ``model(x)`` maps float32 [B, 3, h, w] to logits [B, C, h, w]; with
        ``with_var`` the dual network's ``branch1``/``branch2`` are called instead to get the
        variance map too (``branch(x) -> (feature, logits, var)``).
    crop_size, stride_rate: window side (px) and step fraction (stride = ceil(crop * rate)).
    scales: image scale factors; their scores are summed.
    flip: add the logits of the horizontally flipped input, flipped back.
    mean, std: RGB normalisation on the 0-1 scale.
    mode: 'slide' (reference windows), 'whole' (one forward on the full normalised image) or
        'center_pad' (U2PL VOC validation: one forward on the image padded/centre-cropped to
        ``crop x crop``; single scale).
    average: 'sum' (window logits summed, the reference) or 'logits' (averaged over the
        passes that cover a pixel, U2PL).
    label_pad: ground-truth value of the padding in mode 'center_pad' (255 = ignored;
        U2PL: 0 = background).
    batch_windows: windows per forward (0 = all windows of an image at once).
    branch: 1, 2 or 'mean', used only with ``with_var`` (None: ``model.eval_branch`` or 1).
    channels_last: convert the model (in place) and the inputs to channels-last memory
        format, which runs the convolutions faster (about 1.4x for ResNet-50 on CPU); the
        logits can differ from the default layout in the last float32 bits.
    resize: how scales are made: 'image' (cv2 bilinear of the uint8 image, scores back with
        cv2 bilinear: the reference) or 'normalized_cubic' (LPL: cv2 bicubic of the normalised
        float image, scores back with bilinear align_corners=True).
    crf: DenseCRF after the softmax of the averaged logits (needs ``average='logits'``, a
        mode that predicts the full image, and the optional package pydensecrf2).
    uncertainty: also return the averaged logits, the variance map and, for a dual network,
        both branches' averaged logits (see :class:`Prediction`); both branches then run
        (about twice the time). ``pred`` and ``score`` are unchanged.
    """

    def __init__(self, model: torch.nn.Module, num_classes: int, *, crop_size: int,
                 stride_rate: float = 2 / 3, scales: Sequence[float] = (1,), flip: bool = False,
                 mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), mode: str = "slide",
                 batch_windows: int = 4, device: Union[str, torch.device] = "cpu",
                 amp: str = "off", with_var: bool = False,
                 branch: Union[int, str, None] = None, channels_last: bool = False,
                 uncertainty: bool = False, average: str = "sum", label_pad: int = 255,
                 resize: str = "image", crf: bool = False):
        if mode not in MODES:
            raise ValueError(f"eval_mode must be one of {MODES}, got {mode!r}")
        if average not in AVERAGES:
            raise ValueError(f"eval_average must be one of {AVERAGES}, got {average!r}")
        if resize not in RESIZES:
            raise ValueError(f"eval_resize must be one of {RESIZES}, got {resize!r}")
        if crf and (average != "logits" or mode in FRAMED):
            raise ValueError(f"eval_crf needs eval_average='logits' (its unary is the softmax "
                             f"of the averaged logits) and eval_mode 'whole' or 'slide' (the "
                             f"full image), got eval_average={average!r}, eval_mode={mode!r}")
        if crf:
            from .crf import require_densecrf
            require_densecrf("eval_crf")
        if not scales:
            raise ValueError("eval_scale_array is empty; use [1] for single-scale evaluation")
        if mode in ("center_pad", "resize") and [float(s) for s in scales] != [1.0]:
            raise ValueError(f"eval_mode '{mode}' is single-scale (the prediction covers the "
                             f"padded crop); set eval_scale_array=[1], got {list(scales)}")
        if isinstance(label_pad, bool) or int(label_pad) != label_pad or \
                not 0 <= int(label_pad) <= 255:
            raise ValueError(f"eval_label_pad must be an integer in 0..255, got {label_pad!r}")
        if batch_windows < 0:
            raise ValueError(f"eval_batch_windows must be >= 0, got {batch_windows}")
        self.model = model
        self.num_classes = int(num_classes)
        self.crop = int(crop_size)
        self.stride_rate = float(stride_rate)
        self.scales = [float(s) for s in scales]
        self.flip = bool(flip)
        self.mode = mode
        self.average = average
        self.label_pad = int(label_pad)
        self.resize = resize
        self.crf = bool(crf)
        self.std_rgb = [float(v) for v in std]
        self.mean_rgb = [float(m) for m in mean]
        self.batch_windows = int(batch_windows)
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype(amp, self.device)
        self.branch = branch if branch is not None else getattr(model, "eval_branch", 1)
        self.uncertainty = bool(uncertainty)
        self.with_var = (bool(with_var) or self.uncertainty) and hasattr(model, "branch1")
        self.both_branches = self.uncertainty and self.with_var and hasattr(model, "branch2")
        self.lut = torch.from_numpy(normalization_lut(mean, std)).to(self.device)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, model: torch.nn.Module, C, device: Union[str, torch.device] = "cpu",
                    with_var: bool = False, channels_last: bool = True,
                    uncertainty: bool = False) -> "SegEvaluator":
        """Build from a furnace Config (eval_* keys, image_mean/std, amp, eval_branch)."""
        return cls(model, C.num_classes, crop_size=C.eval_crop_size,
                   stride_rate=C.eval_stride_rate, scales=C.eval_scale_array, flip=C.eval_flip,
                   mean=C.image_mean, std=C.image_std, mode=C.get("eval_mode", "slide"),
                   batch_windows=C.get("eval_batch_windows", 4), device=device,
                   amp=C.get("amp", "off"), with_var=with_var, branch=C.get("eval_branch", 1),
                   channels_last=channels_last, uncertainty=uncertainty,
                   average=C.get("eval_average", "sum"),
                   label_pad=C.get("eval_label_pad", 255),
                   resize=C.get("eval_resize", "image"), crf=C.get("eval_crf", False))

    # -- the frame that is scored ---------------------------------------------------------

    def eval_label(self, label: torch.Tensor) -> torch.Tensor:
        """Ground truth [H, W] in the frame of ``Prediction.pred``: unchanged, except in mode
        'center_pad' where it is padded with ``label_pad`` and centre-cropped to the crop."""
        if self.mode == "resize":
            return F.interpolate(label[None, None].float(), size=(self.crop, self.crop),
                                 mode="nearest")[0, 0].to(label.dtype)
        if self.mode != "center_pad":
            return label
        return center_pad_crop(label, self.crop, self.label_pad)

    def eval_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB image [H, W, 3] in the frame of ``Prediction.pred`` (for pictures): in
        mode 'center_pad' padded with the mean colour (what 0 after normalisation shows)."""
        if self.mode == "resize":
            return cv2.resize(np.ascontiguousarray(image), (self.crop, self.crop),
                              interpolation=cv2.INTER_LINEAR)
        if self.mode != "center_pad":
            return image
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        out = torch.stack([center_pad_crop(t[c], self.crop, int(round(m * 255)))
                           for c, m in enumerate(self.mean_rgb)], -1)
        return out.numpy()

    # -- network calls -------------------------------------------------------------------

    def _net(self, x: torch.Tensor
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Logits [B, C, h, w], variance [B, h, w] (or None) and, with ``both_branches``,
        both branches' logits [B, 2, C, h, w] (else None) for a normalised batch."""
        if not self.with_var:
            return self.model(x), None, None
        branches = (1, 2) if self.branch == "mean" else (int(self.branch),)
        outs = {b: getattr(self.model, f"branch{b}")(x)
                for b in ((1, 2) if self.both_branches else branches)}
        logits = var = None
        for b in branches:
            _, lg, v = outs[b]
            logits = lg if logits is None else logits + lg
            var = v if var is None else var + v
        if len(branches) > 1:
            logits, var = logits / len(branches), var / len(branches)
        pair = torch.stack([outs[1][1], outs[2][1]], 1) if self.both_branches else None
        return logits, var[:, 0], pair

    def _forward(self, x: torch.Tensor
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Window scores (flip added) as float32 [B, C, h, w], mean variance [B, h, w] and
        the branch pair's scores (flip added) [B, 2, C, h, w] or None."""
        n = x.shape[0]
        if self.flip:  # one batched call for both orientations
            x = torch.cat([x, x.flip(-1)], dim=0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device.type, self.amp_dtype):
            logits, var, pair = self._net(x)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the network returns {logits.shape[1]} classes but num_classes is "
                             f"{self.num_classes}")
        logits = logits.float()
        var = var.float() if var is not None else None
        pair = pair.float() if pair is not None else None
        size = tuple(x.shape[-2:])
        if tuple(logits.shape[-2:]) != size:  # a stride-4 decoder: upsample as U2PL does
            logits = _upsample(logits, size)
            var = _upsample(var[:, None], size)[:, 0] if var is not None else None
            pair = (_upsample(pair.flatten(1, 2), size).view(*pair.shape[:3], *size)
                    if pair is not None else None)
        if self.flip:
            logits = logits[:n] + logits[n:].flip(-1)
            if var is not None:
                var = (var[:n] + var[n:].flip(-1)) / 2
            if pair is not None:
                pair = pair[:n] + pair[n:].flip(-1)
        return logits, var, pair

    # -- one scale ------------------------------------------------------------------------

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [h, w, 3] on the device -> normalised float32 [3, h, w] (via the table)."""
        idx = image.long().permute(2, 0, 1)                     # [3, h, w]
        return torch.gather(self.lut, 1, idx.reshape(3, -1)).reshape(idx.shape)

    def scale_process(self, image: torch.Tensor
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores of one (already scaled) uint8 image [h, w, 3] on the device.

        Returns the summed window logits float32 [C, h, w] (margins cropped off) and the
        window-averaged variance float32 [h, w] (or None).
        """
        score, var, _, _ = self._scale_process(image)
        return score, var

    def _scale_process(self, image: torch.Tensor):
        """:meth:`scale_process` (``image`` may also be a normalised float32 [3, h, w]) plus,
        with ``uncertainty``, the number of forward passes summed into each pixel's score
        (float32 [h, w]: windows x flips) and the branch pair's summed scores [2, C, h, w]
        (or None)."""
        if image.dtype == torch.uint8:
            h, w = int(image.shape[0]), int(image.shape[1])
            x = self._normalize(image)
        else:                                   # already normalised float [3, h, w]
            h, w = int(image.shape[1]), int(image.shape[2])
            x = image
        passes = 2.0 if self.flip else 1.0
        if self.mode in ("whole", "center_pad", "resize"):
            if self.mode == "center_pad":   # pad with 0 after normalisation: the mean colour
                x = center_pad_crop(x, self.crop, 0.0)
                h = w = self.crop
            elif self.mode == "resize":     # normalisation is per channel: it commutes
                x = F.interpolate(x[None], size=(self.crop, self.crop), mode="bilinear",
                                  align_corners=False)[0]
                h = w = self.crop
            score, var, pair = self._forward(x[None])
            score, pair = score[0], (pair[0] if pair is not None else None)
            count = torch.full((h, w), passes, device=self.device) if self.uncertainty else None
            if self.average == "logits" and passes != 1.0:
                score = score / passes
                pair = pair / passes if pair is not None else None
                count = torch.ones_like(count) if count is not None else None
            return score, (var[0] if var is not None else None), count, pair

        g = sliding_windows(h, w, self.crop, self.stride_rate)
        top, bottom, left, right = g.margin
        ph, pw = g.padded_hw
        if g.mode == "single":
            fill = torch.zeros(3, 1, 1, device=self.device)      # 0 after normalisation
        else:
            fill = self.lut[:, 0].reshape(3, 1, 1)              # raw 0, normalised
        padded = fill.expand(3, ph, pw).clone()
        padded[:, top:top + h, left:left + w] = x

        acc = torch.zeros(self.num_classes, ph, pw, device=self.device)
        var_acc = count = pair_acc = None
        if self.with_var or self.uncertainty or self.average == "logits":
            count = torch.zeros(ph, pw, device=self.device)
        if self.with_var:
            var_acc = torch.zeros(ph, pw, device=self.device)
        if self.both_branches:
            pair_acc = torch.zeros(2, self.num_classes, ph, pw, device=self.device)
        step = self.batch_windows or len(g.windows)
        for start in range(0, len(g.windows), step):
            chunk = g.windows[start:start + step]
            batch = torch.stack([padded[:, y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])
            scores, var, pair = self._forward(batch)
            # visiting order as the reference, so the float32 sums are bit-identical
            for i, (y0, y1, x0, x1) in enumerate(chunk):
                acc[:, y0:y1, x0:x1] += scores[i]
                if count is not None:
                    count[y0:y1, x0:x1] += 1
                if var is not None:
                    var_acc[y0:y1, x0:x1] += var[i]
                if pair is not None:
                    pair_acc[:, :, y0:y1, x0:x1] += pair[i]
        y0, y1, x0, x1 = g.crop_back
        score = acc[:, y0:y1, x0:x1]
        var = (var_acc / count.clamp_min(1))[y0:y1, x0:x1] if var_acc is not None else None
        pair = pair_acc[:, :, y0:y1, x0:x1] if pair_acc is not None else None
        passes = None
        if self.average == "logits":   # every pixel is covered by >= 1 window
            n = count[y0:y1, x0:x1] * (2.0 if self.flip else 1.0)
            score = score / n
            pair = pair / n if pair is not None else None
            passes = torch.ones_like(n) if self.uncertainty else None
        elif self.uncertainty:
            passes = count[y0:y1, x0:x1] * (2.0 if self.flip else 1.0)
        return score, var, passes, pair

    # -- one image ------------------------------------------------------------------------

    def _normalized_scales(self, image: np.ndarray):
        """Yield (scale, normalised float32 [3, h, w] on the device) per scale, made as LPL's
        test does: normalise the uint8 image, then cv2 bicubic of the float image."""
        lut = self.lut.cpu().numpy()
        norm = np.stack([lut[c][image[:, :, c]] for c in range(3)], -1)     # [H, W, 3]
        for s in self.scales:
            img_s = cv2.resize(norm, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
            yield s, torch.from_numpy(np.ascontiguousarray(img_s.transpose(2, 0, 1))
                                      ).to(self.device)

    def _uint8_scales(self, image: np.ndarray):
        for s in self.scales:
            img_s = image if s == 1 else cv2.resize(image, None, fx=s, fy=s,
                                                    interpolation=cv2.INTER_LINEAR)
            yield s, torch.from_numpy(np.ascontiguousarray(img_s)).to(self.device)

    def _back(self, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """[K, h, w] resized to [K, H, W] as the resize protocol does."""
        if self.resize == "normalized_cubic":
            return _upsample(t[None].float(), (H, W))[0]
        return self._resize(t, H, W)

    @torch.inference_mode()
    def predict(self, image: np.ndarray, classes=None) -> Prediction:
        """Predict one RGB uint8 image [H, W, 3] (numpy). See :class:`Prediction`.

        classes: None, or flags [C] (bool or 0/1, numpy or torch): ``pred`` is then the argmax
        over these classes only (ties to the lowest index); ``score`` is not restricted.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} "
                             f"{tuple(image.shape)}")
        H, W = image.shape[:2]
        total = var_total = mean_total = pair_total = None
        scaled = (self._normalized_scales(image) if self.resize == "normalized_cubic"
                  else self._uint8_scales(image))
        for s, img_t in scaled:
            score, var, passes, pair = self._scale_process(img_t)
            if self.uncertainty:  # averages per scale, resized like the score
                mean = score / passes
                pair = pair / passes if pair is not None else None
                if tuple(score.shape[1:]) != (H, W) and self.mode not in FRAMED:
                    mean = self._back(mean, H, W)
                    pair = (self._back(pair.flatten(0, 1), H, W).view(2, -1, H, W)
                            if pair is not None else None)
                mean_total = mean if mean_total is None else mean_total + mean
                if pair is not None:
                    pair_total = pair if pair_total is None else pair_total + pair
            if tuple(score.shape[1:]) != (H, W) and self.mode not in FRAMED:
                if self.resize == "normalized_cubic":
                    score = self._back(score, H, W)
                    var = self._back(var[None], H, W)[0] if var is not None else None
                else:
                    score, var = self._resize_back(score, var, H, W)
            if len(self.scales) == 1:
                total, var_total = score, var        # float32 argmax == float64 argmax here
            else:
                total = score.double() if total is None else total + score.double()
                if var is not None:
                    var_total = var if var_total is None else var_total + var
        if var_total is not None and len(self.scales) > 1:
            var_total = var_total / len(self.scales)
        if mean_total is not None and len(self.scales) > 1:
            mean_total = mean_total / len(self.scales)
            pair_total = pair_total / len(self.scales) if pair_total is not None else None
        decide = total
        if self.crf:   # average='logits': total / scales is the mean of every pass's logits
            decide = self._crf(image, total / len(self.scales))
        pred = decide.argmax(0) if classes is None else restricted_argmax(decide, classes)
        return Prediction(pred=pred, score=total, var=var_total, logits=mean_total,
                          branch_logits=pair_total)

    def _crf(self, image: np.ndarray, mean_logits: torch.Tensor) -> torch.Tensor:
        """DenseCRF's Q [C, H, W] (on the device) from the averaged logits [C, H, W]: unary
        from their softmax (float32), pairwise terms on the de-normalised image."""
        from .crf import crf_image, dense_crf
        prob = torch.softmax(mean_logits.float(), 0).cpu().numpy()
        lut = self.lut.cpu().numpy()
        norm = np.stack([lut[c][image[:, :, c]] for c in range(3)], 0)     # [3, H, W]
        rgb = crf_image(norm, self.mean_rgb, self.std_rgb)
        return torch.from_numpy(dense_crf(rgb, prob)).to(self.device)

    def _resize(self, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """cv2 bilinear float32 resize of [K, h, w] to [K, H, W] (channels in chunks of 512,
        cv2's limit)."""
        hwc = t.permute(1, 2, 0).float().cpu().numpy()
        parts = []
        for k in range(0, hwc.shape[2], 512):
            out = cv2.resize(np.ascontiguousarray(hwc[:, :, k:k + 512]), (W, H),
                             interpolation=cv2.INTER_LINEAR)
            parts.append(out[:, :, None] if out.ndim == 2 else out)
        return torch.from_numpy(np.concatenate(parts, 2)).to(self.device).permute(2, 0, 1)

    def _resize_back(self, score, var, H, W):
        """cv2 bilinear float32 resize of [C, h, w] (and [h, w]) to H x W, as the reference."""
        hwc = score.permute(1, 2, 0).float().cpu().numpy()
        out = cv2.resize(hwc, (W, H), interpolation=cv2.INTER_LINEAR)
        if out.ndim == 2:  # cv2 drops a single channel
            out = out[:, :, None]
        score = torch.from_numpy(out).to(self.device).permute(2, 0, 1)
        if var is not None:
            v = cv2.resize(var.float().cpu().numpy(), (W, H), interpolation=cv2.INTER_LINEAR)
            var = torch.from_numpy(v).to(self.device)
        return score, var
