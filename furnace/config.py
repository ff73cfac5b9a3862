"""Experiment configuration: defaults, environment and command-line overrides, derived values.

An experiment folder (``exp_voc/``, ``exp_city/``, ``exp_demo/``) holds a ``config.py`` that
builds a :class:`Config` from :func:`base_config` and sets its dataset's values; users edit it.
Scripts load it with :func:`load_config`, which applies, in order:

1. the environment variables of the reference code (``volna``, ``snapshot_dir``,
   ``learning_rate``, ``batch_size``, ``snapshot_iter``, ``debug``),
2. ``--set key=value`` overrides from the command line (nested keys as
   ``dueb.aleatoric.per_pixel``),
3. derived values (split file names, image counts, iterations per epoch, OHEM ``min_kept``,
   log and snapshot paths), recomputed after the overrides unless a key was set explicitly.

This module holds what every run shares (data, model, optimisation, checkpoints, evaluation).
Each method's options are a group ``C.<method>`` declared beside the method, torch-free
(:mod:`furnace.methods.options`: ``furnace/methods/dueb_options.py``, ``u2pl_options.py``):
:func:`base_config` adds every registered group's defaults, :func:`validate` runs every
group's checks, and the old top-level names a group declares keep working (see
:class:`Config`). This module names no method.

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the fix."""


class Config(dict):
    """A dict with attribute access (``C.lr`` is ``C['lr']``); nested Configs for sub-options.

    Old names: a method's option group may declare aliases, top-level names its keys had
    before they moved into the group (:mod:`furnace.methods.options`; DUEB's
    ``C.unsup_weight`` is ``C.dueb.unsup_weight``). In a Config that holds that group,
    reading, setting and ``in`` of an old name act on the group's key (attribute access,
    ``[]``, ``get``, ``update``), so a config file, ``--set`` or an older checkpoint's config
    that uses it sets the same value. Old names are not keys: iteration, ``to_dict`` and
    ``--print-config`` show the new layout only.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"config has no key '{name}'; known keys: {', '.join(sorted(self))}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __missing__(self, key: Any) -> Any:
        target = _alias(self, key)
        if target is None:
            raise KeyError(key)
        group, leaf = target
        return dict.__getitem__(self, group)[leaf]

    def __contains__(self, key: Any) -> bool:
        return dict.__contains__(self, key) or _alias(self, key) is not None

    def __setitem__(self, key: Any, value: Any) -> None:
        target = None if dict.__contains__(self, key) else _alias(self, key)
        if target is None:
            dict.__setitem__(self, key, value)
        else:
            dict.__getitem__(self, target[0])[target[1]] = value

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        """Plain nested dicts (for checkpoints and logs)."""
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _aliases() -> Mapping[str, Tuple[str, str]]:
    """Old top-level name -> (group, key in the group), as the method option groups declare
    them (imported on first use: the registry imports config)."""
    from .methods.options import aliases
    return aliases()


def _alias(C: Mapping, key: Any) -> Optional[Tuple[str, str]]:
    """(group, key) that the old name ``key`` stands for in ``C``, or None (not an old name,
    or ``C`` does not hold its group: nested groups never resolve them)."""
    if not isinstance(key, str):
        return None
    target = _aliases().get(key)
    if target is not None and isinstance(dict.get(C, target[0]), Mapping):
        return target
    return None


def canonical_key(C: Mapping, key: str) -> str:
    """The dotted key that ``key`` names in ``C``, its first part's old name resolved
    (``aleatoric.per_pixel`` -> ``dueb.aleatoric.per_pixel``)."""
    head, _, rest = key.partition(".")
    target = _alias(C, head)
    if target is None or dict.__contains__(C, head):
        return key
    return ".".join(target) + (f".{rest}" if rest else "")


def data_root(*parts: str, env: Optional[Mapping[str, str]] = None) -> str:
    """Path under the data root: ``<repo>/DATA`` by default.

    The env var ``volna`` (kept from the reference) overrides the root. It may point at a folder
    that contains ``DATA/`` (the reference convention) or at the data folder itself; no trailing
    slash is needed.
    """
    env = os.environ if env is None else env
    root = Path(env["volna"]).expanduser() if env.get("volna") else REPO_ROOT / "DATA"
    if (root / "DATA").is_dir():
        root = root / "DATA"
    return str(root.joinpath(*parts))


# Top-level keys restricted to a set of values (a method's group declares its own checks).
CHOICES = {
    "dataset": ("voc", "city"),
    "backbone": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "stem": ("deep", "classic"),
    "output_stride": (8, 16),
    "eval_branch": (1, 2, "mean"),
    "eval_mode": ("slide", "whole", "center_pad", "resize"),
    "val_eval_mode": (None, "slide", "whole", "center_pad", "resize"),
    "eval_average": ("sum", "logits"),
    "eval_resize": ("image", "normalized_cubic"),
    "eval_absent_iou": ("skip", "zero"),
    "train_scale_mode": ("choice", "u2pl", "resize"),
    "amp": ("auto", "off", "bf16", "fp16"),
    "sup_loss": ("ce", "ohem"),
}

# Top-level keys whose value may be None or a string.
OPTIONAL_STR = ("pretrained_model", "class_names", "train_source", "unsup_source",
                "snapshot_dir", "voc_train_folder")
# Top-level keys whose value may be None or an int (derived when None).
OPTIONAL_INT = ("num_train_imgs", "num_unsup_imgs", "max_samples", "niters_per_epoch",
                "ohem_min_kept", "snapshot_keep", "snapshot_from", "stop_after_epoch",
                "reference_gpus")


def _option_groups():
    """The registered method option groups (``C.dueb``, ``C.u2pl``, ...), torch-free."""
    from .methods.options import option_groups
    return option_groups()


def base_config() -> Config:
    """Values shared by every experiment (REFERENCE 1.3); dataset configs set the rest."""
    C = Config()
    # data
    C.dataset = "voc"
    C.dataset_path = data_root("pascal_voc")
    C.split_dir = "subset_train_aug"          # where train_aug_{labeled,unlabeled}_1-N.txt live
    C.train_source = None                      # derived from labeled_ratio
    C.unsup_source = None                      # derived from labeled_ratio
    C.eval_source = "val.txt"
    C.class_names = None                       # None: the dataset's standard names
    C.num_classes = 21
    C.total_train_imgs = 10582                 # size of the full training list
    C.num_eval_imgs = 1449
    C.labeled_ratio = 4
    C.num_train_imgs = None                    # total // labeled_ratio
    C.num_unsup_imgs = None                    # total - num_train_imgs
    C.max_samples = None                       # training dataset length, max of the two
    C.image_mean = [0.485, 0.456, 0.406]
    C.image_std = [0.229, 0.224, 0.225]
    C.image_height = 512
    C.image_width = 512
    C.train_scale_array = [0.5, 0.75, 1, 1.5, 1.75, 2.0]
    C.num_workers = 4
    C.generate_demo_data = False               # True: generate the demo dataset if missing
    C.allow_outside_root = False               # True: list entries may leave dataset_path
    # VOC folder of train_source/unsup_source (None: from the list name, 'train' -> train_aug/);
    # 'train_aug' reads lists named otherwise, such as U2PL's labeled.txt. eval_source: by name
    C.voc_train_folder = None
    # 'choice': a scale from train_scale_array; 'u2pl': p 0.5 U[min, 1) else U[1, max) of
    # train_scale_array (U2PL: [0.5, 2.0]), size int(h*s) x int(w*s); 'resize': resize to
    # image_height x image_width ignoring the aspect ratio, flip, no crop (ELN's VOC)
    C.train_scale_mode = "choice"
    C.train_label_pad = 255                    # label of the crop padding (U2PL: 0)
    # image-level class labels (LPL): 'masks' derives them from each image's full label PNG
    # (255 counts as 0, every value present is a class), or a list file (relative to
    # dataset_path or absolute) of lines '<id> <c1> <c2> ...' (furnace/data/image_labels.py)
    C.image_labels = "masks"
    # CutMix boxes of the data layer's stream unlabeled0 (REFERENCE 3.5; loader.cutmix_collate),
    # which any method may declare (DUEB; U2PL draws its own boxes)
    C.cutmix_mask_prop_range = [0.25, 0.5]
    C.cutmix_boxmask_n_boxes = 3
    C.cutmix_boxmask_fixed_aspect_ratio = False
    C.cutmix_boxmask_by_size = False
    C.cutmix_boxmask_outside_bounds = False
    C.cutmix_boxmask_no_invert = False
    # model
    C.backbone = "resnet50"
    C.stem = "deep"
    C.output_stride = 16
    C.head_channels = 256                      # ASPP/decoder width (256 = reference)
    C.backbone_width = 64                      # ResNet layer1 width (64 = reference)
    C.pretrained_model = data_root("pytorch-weight", "resnet50_v1c.pth")
    C.pretrained_strict = True
    C.bn_eps = 1e-5
    C.bn_momentum = 0.1
    # supervised loss (methods.common.sup_criterion: DUEB, supervised; U2PL's own min_kept)
    C.sup_loss = "ce"                          # 'ce' (VOC) or 'ohem' (Cityscapes)
    C.ohem_thresh = 0.7
    C.ohem_min_kept_per_image = 50000          # min_kept = this * batch per process
    C.ohem_min_kept = None
    C.ohem_class_weight = False                # True: the 19 Cityscapes class weights
    # the method the engine trains (furnace/methods/: dueb, supervised, u2pl, ...)
    C.method = "dueb"
    # each method's options: one group per method, C.<name>.* (C.dueb, C.u2pl), declared
    # beside the method (furnace/methods/<name>_options.py, registered in options.py)
    for group in _option_groups():
        C[group.name] = group.defaults()
    # optimisation
    C.seed = 12345
    C.lr = 0.005
    C.lr_power = 0.9
    C.momentum = 0.9
    C.weight_decay = 1e-4
    C.batch_size = 8
    C.nepochs = 40
    C.niters_per_epoch = None                  # max_samples // batch_size
    # the reference's GPU count W: per-GPU quantities are computed over batch_size / W images
    # per stream (furnace/methods/groups.py); None: one group per process
    C.reference_gpus = None
    C.warm_up_epoch = 0
    # the references train in fp32; 'bf16' is the speed option on GPUs (auto: bf16 on CUDA)
    C.amp = "off"
    C.deterministic = False
    C.debug = 0                                # >0: only this many iterations per epoch
    # checkpoints and logs
    C.snapshot_iter = 2
    C.snapshot_from = None                     # save after epochs > this (None: nepochs // 6)
    C.stop_after_epoch = None                  # end this run after that epoch (resume with -c)
    C.snapshot_keep = None                     # keep the last K epoch files (None: all)
    C.snapshot_every_iters = 0                 # >0: also a resumable epoch-last.pth every N
    C.eval_every = 0                           # >0: validate every N epochs, keep best.pth
    C.eval_uncertainty = False                 # True: validation adds AUROC/AUPR/ECE
    C.snapshot_dir = None                      # <log_dir>/snapshot
    C.log_dir = "log"                          # relative to the experiment folder
    C.tb_images_every = 200                    # iterations between tensorboard image dumps
    # evaluation
    C.eval_crop_size = 512
    C.eval_stride_rate = 2 / 3
    C.eval_scale_array = [1]
    C.eval_flip = False
    C.eval_branch = 1
    # 'slide' windows, 'whole' image, 'resize' (ELN's VOC val: image and ground truth
    # resized to eval_crop_size x eval_crop_size, one forward; single scale), or
    # 'center_pad': U2PL's VOC val (pad/centre-crop to eval_crop_size, one forward, mIoU over
    # the crop; single scale)
    C.eval_mode = "slide"
    # eval_mode of the validation during training (None: eval_mode); U2PL's Cityscapes code
    # validates on the central crop (center_pad) and keeps the best by that number
    C.val_eval_mode = None
    C.eval_average = "sum"                     # windows' logits 'sum' (CPS) or 'logits' mean (U2PL)
    C.eval_label_pad = 255                     # center_pad: label of the padding (U2PL: 0)
    # how a scale is made: 'image' (cv2 bilinear of the uint8 image, scores back with cv2
    # bilinear) or 'normalized_cubic' (LPL: cv2 bicubic of the normalised float image, scores
    # back with bilinear align_corners=True; with eval_mode=whole, eval_average=logits)
    C.eval_resize = "image"
    # True: each image's argmax only over the classes of its ground truth (the image-level
    # label: 255 -> 0, classes present); LPL's stage-1 "eval with image-level labels" (oracle)
    C.eval_class_mask = False
    # True: DenseCRF on the softmax of the averaged logits (LPL's retest; needs
    # eval_average=logits and the optional package: pip install pydensecrf2)
    C.eval_crf = False
    # mIoU: a class with no ground truth and no prediction is left out ('skip', nanmean) or
    # counts as IoU 0 in the mean over all classes ('zero', LPL)
    C.eval_absent_iou = "skip"
    C.eval_batch_windows = 4
    return C


# ----------------------------------------------------------------------------- overrides

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _value_rules(path: str):
    """(allowed values or None, the type a None-able key takes or None) of a dotted key:
    top-level keys from :data:`CHOICES` / ``OPTIONAL_*``, group keys from their group."""
    head, _, rest = path.partition(".")
    if not rest:
        optional = str if head in OPTIONAL_STR else int if head in OPTIONAL_INT else None
        return CHOICES.get(head), optional
    for group in _option_groups():
        if group.name == head:
            return None, group.optional.get(rest)
    return None, None


def _parse_value(key: str, text: str, current: Any, source: str,
                 path: Optional[str] = None) -> Any:
    """Parse ``text`` into the type of ``current`` (the default) or raise ConfigError.
    ``key``: the key as written (for messages); ``path``: the key it names (old names
    resolved; default ``key``)."""
    allowed, optional = _value_rules(path or key)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {text!r} (from {source})")

    low = text.strip().lower()
    if allowed is not None:
        for a in allowed:
            if low == str(a).lower():
                return a
        raise bad("one of " + ", ".join(map(str, allowed)))
    if low in ("none", "null") and (current is None or optional is not None):
        return None
    if isinstance(current, bool):
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad("a boolean (true/false)")
    if isinstance(current, int) or optional is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(current, float) or optional is float:
        try:
            return float(text)
        except ValueError:
            raise bad("a number") from None
    if isinstance(current, (list, tuple)):
        try:
            value = ast.literal_eval(text) if text.strip()[:1] in "[(" else \
                [ast.literal_eval(v) for v in text.split(",") if v.strip()]
        except (ValueError, SyntaxError):
            raise bad("a list such as [0.5,1.0] or 0.5,1.0") from None
        if not isinstance(value, (list, tuple)):
            value = [value]
        return list(value)
    if isinstance(current, Config):
        raise ConfigError(f"config key '{key}' is a group; set one of its keys instead, e.g. "
                          f"{key}.{next(iter(current))}=... (from {source})")
    return text


def _lookup(C: Config, key: str, source: str):
    """Return (parent Config, leaf name) for a dotted key, or raise for unknown keys.
    Old names of the top level resolve to their group's keys."""
    parts = key.split(".")
    node = C
    for i, part in enumerate(parts):
        if not isinstance(node, Config) or part not in node:
            known = sorted(node) if isinstance(node, Config) else []
            # a near old name is suggested as the key it stands for
            old = {name: canonical_key(node, name) for name in _aliases()} if known else {}
            old = {name: new for name, new in old.items() if new != name}
            hint = difflib.get_close_matches(part, known + sorted(old), n=3)
            hint = list(dict.fromkeys(old.get(h, h) for h in hint))
            prefix = ".".join(parts[:i])
            where = f" in group '{prefix}'" if prefix else ""
            msg = f"unknown config key '{key}'{where} (from {source})"
            msg += f"; did you mean {', '.join(hint)}?" if hint else \
                f"; known keys: {', '.join(known)}"
            raise ConfigError(msg)
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def set_value(C: Config, key: str, text: str, source: str = "--set") -> None:
    """Set a (possibly dotted) key from its text form, checking name and type. An old name
    (see :class:`Config`) sets the key of its group."""
    parent, leaf = _lookup(C, key, source)
    parent[leaf] = _parse_value(key, text, parent[leaf], source, canonical_key(C, key))


def apply_overrides(C: Config, overrides: Iterable[str]) -> None:
    """Apply ``key=value`` strings (``--set``) to ``C`` in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}; "
                              "example: --set batch_size=4 backbone=resnet18")
        key, text = item.split("=", 1)
        set_value(C, key.strip(), text, source=f"--set {item}")


def apply_env(C: Config, env: Mapping[str, str]) -> None:
    """Environment overrides of the reference (REFERENCE 1.5); ``volna`` acts via data_root."""
    for var, key in (("learning_rate", "lr"), ("batch_size", "batch_size"),
                     ("snapshot_iter", "snapshot_iter")):
        if env.get(var):
            set_value(C, key, env[var], source=f"env {var}")
    if env.get("snapshot_dir"):
        C.snapshot_dir = str(Path(env["snapshot_dir"]) / "snapshot")
    if env.get("debug") is not None and env.get("debug") != "":
        text = env["debug"].strip().lower()
        if text in _FALSE:       # the reference treated debug=0 as on (QUIRK 16); we do not
            C.debug = 0
        elif text in _TRUE:
            C.debug = 10
        else:
            set_value(C, "debug", env["debug"], source="env debug")


# ----------------------------------------------------------------------------- derived values

def finalize(C: Config, exp_dir: Optional[os.PathLike] = None) -> Config:
    """Return a copy of ``C`` with derived values filled in and every value validated."""
    C = copy.deepcopy(C)
    exp_dir = Path(exp_dir) if exp_dir is not None else Path(C.get("exp_dir") or os.getcwd())
    exp_dir = exp_dir.resolve()
    C.exp_dir = str(exp_dir)

    for key in ("labeled_ratio", "batch_size", "nepochs", "num_classes", "total_train_imgs"):
        if not isinstance(C[key], int) or C[key] < 1:
            raise ConfigError(f"config key '{key}' must be a positive integer, got {C[key]!r}")
    if C.num_classes < 2:
        raise ConfigError(f"config key 'num_classes' must be >= 2, got {C.num_classes}")
    for key, allowed in CHOICES.items():
        if key in C and C[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {allowed}, got {C[key]!r}")
    if C.class_names is not None and len(C.class_names) != C.num_classes:
        raise ConfigError(f"config key 'class_names' has {len(C.class_names)} names but "
                          f"num_classes is {C.num_classes}; make them agree")

    if not isinstance(C.dataset_path, str) or not C.dataset_path.strip():
        # Path("") is the current folder: an empty value must not read data from there
        raise ConfigError(f"config key 'dataset_path' is empty; set it to the dataset folder, "
                          f"e.g. --set dataset_path=/data/pascal_voc (see DATA/README.md)")
    C.dataset_path = _unnest(C.dataset_path, C.eval_source)
    ratio = C.labeled_ratio
    if C.train_source is None:
        C.train_source = f"{C.split_dir}/train_aug_labeled_1-{ratio}.txt"
    if C.unsup_source is None:
        C.unsup_source = f"{C.split_dir}/train_aug_unlabeled_1-{ratio}.txt"
    # image counts from the list files when they exist (the config's totals otherwise)
    listed = _list_counts(C)
    from_total = (C.total_train_imgs // ratio,
                  C.total_train_imgs - C.total_train_imgs // ratio)
    if listed is not None and listed != from_total and (C.num_train_imgs is None
                                                         or C.num_unsup_imgs is None):
        logging.getLogger("furnace.config").warning(
            "the list files hold %d labelled and %d unlabelled images (%s, %s) but "
            "total_train_imgs=%d at labeled_ratio=%d gives %d and %d; using the list counts "
            "(set num_train_imgs / num_unsup_imgs to choose)", listed[0], listed[1],
            C.train_source, C.unsup_source, C.total_train_imgs, ratio, *from_total)
    counts = listed if listed is not None else from_total
    if listed is not None and listed[0] == 0 and C.num_train_imgs is None:
        # the derived num_train_imgs would be 0 and blamed instead of the list
        raise ConfigError(f"list file {Path(C.dataset_path) / C.train_source} is empty: the "
                          "labelled list must name one image per line (train_source / "
                          "labeled_ratio; generate splits with `python -m furnace.data.splits`)")
    if C.num_train_imgs is None:
        C.num_train_imgs = counts[0]
    if C.num_unsup_imgs is None:
        C.num_unsup_imgs = counts[1]
    if C.max_samples is None:
        C.max_samples = max(C.num_train_imgs, C.num_unsup_imgs)
    if C.niters_per_epoch is None:
        # the reference's int(ceil(a // b)) is a floor division
        C.niters_per_epoch = max(1, C.max_samples // C.batch_size)
    if C.snapshot_from is None:
        C.snapshot_from = C.nepochs // 6
    if C.ohem_min_kept is None:
        C.ohem_min_kept = C.ohem_min_kept_per_image * C.batch_size

    log_dir = Path(C.log_dir)
    if not log_dir.is_absolute():
        log_dir = exp_dir / log_dir
    C.log_dir = str(log_dir)
    if C.snapshot_dir is None:
        C.snapshot_dir = str(log_dir / "snapshot")
    C.tb_dir = str(log_dir / "tb")
    C.exp_time = time.strftime("%Y_%m_%d_%H_%M_%S", time.localtime())
    # the time has 1 s resolution: the process id keeps two runs started together apart
    C.train_log_file = str(log_dir / f"train_{C.exp_time}_{os.getpid()}.log")
    C.val_log_file = str(log_dir / f"val_{C.exp_time}_{os.getpid()}.log")
    C.link_val_log_file = str(log_dir / "val_last.log")
    validate(C)
    return C


# ----------------------------------------------------------------------------- validation

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Checks:
    """Value checks of a finalised config ``C``, each raising one ConfigError that names the
    key and, where given, the fix. Keys ``C`` does not have are not checked. Used by
    :func:`validate` and by the method option groups' ``check(C)``."""

    def __init__(self, C: Config):
        self.C = C

    def fail(self, key: str, want: str, fix: str = "") -> None:
        raise ConfigError(f"config key '{key}' must be {want}, got {_get(self.C, key)!r}"
                          + (f"; {fix}" if fix else ""))

    def integer(self, key: str, low: int, optional: bool = False, fix: str = "") -> None:
        v = _get(self.C, key)
        if v is _MISSING or (optional and v is None):
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            self.fail(key, f"an integer >= {low}" + (" or none" if optional else ""), fix)

    def number(self, key: str, low: float, high: float = math.inf, low_open: bool = False,
               fix: str = "") -> None:
        v = _get(self.C, key)
        if v is _MISSING:
            return
        ok = _is_number(v) and math.isfinite(v) and v <= high and (v > low if low_open
                                                                    else v >= low)
        if not ok:
            rng = f"({low}" if low_open else f"[{low}"
            self.fail(key, f"a finite number in {rng}, {high}]" if high < math.inf else
                      f"a finite number {'>' if low_open else '>='} {low}", fix)

    def one_of(self, key: str, allowed: tuple, want: Optional[str] = None,
               fix: str = "") -> None:
        v = _get(self.C, key)
        if v is not _MISSING and v not in allowed:
            self.fail(key, want or f"one of {allowed}", fix)


def validate(C: Config) -> None:
    """Raise ConfigError for values that would fail later in the run (after hours of training,
    or as a traceback): counts, rates, scale lists, paths; then each method option group's
    own checks (its values and cross-key combinations). ``C`` is a finalised config."""
    v = Checks(C)
    fail, integer, number = v.fail, v.integer, v.number
    integer("snapshot_iter", 1, fix="1 saves after every epoch")
    integer("debug", 0, fix="0 runs full epochs, N > 0 runs N iterations per epoch")
    integer("num_workers", 0)
    integer("image_height", 1)
    integer("image_width", 1)
    integer("eval_crop_size", 1)
    integer("eval_batch_windows", 1)
    integer("warm_up_epoch", 0)
    integer("tb_images_every", 0)
    integer("seed", 0)
    integer("niters_per_epoch", 1)
    integer("max_samples", 1)
    integer("num_train_imgs", 1)
    integer("num_unsup_imgs", 0)
    integer("snapshot_from", -1_000_000_000)
    integer("snapshot_keep", 1, optional=True, fix="none keeps every epoch file")
    integer("stop_after_epoch", 0, optional=True)
    integer("head_channels", 1)
    integer("backbone_width", 1, fix="64 is the reference ResNet")
    integer("snapshot_every_iters", 0, fix="0 saves only after epochs")
    integer("eval_every", 0, fix="0 turns validation during training off")
    integer("reference_gpus", 1, optional=True, fix="none: one group per process")
    if C.get("reference_gpus") is not None and C.batch_size % C.reference_gpus:
        fail("reference_gpus", f"a divisor of batch_size={C.batch_size}",
             "batch_size is the reference's per-GPU batch times its GPU count")
    if "method" in C and (not isinstance(C.method, str) or not C.method.strip()):
        fail("method", "a method name", "e.g. dueb or supervised (furnace/methods/)")
    number("lr", 0, low_open=True, fix="e.g. --set lr=0.005")
    number("lr_power", 0)
    number("momentum", 0, 1)
    number("weight_decay", 0)
    number("bn_eps", 0, low_open=True)
    number("bn_momentum", 0, 1)
    number("ohem_thresh", 0, 1, low_open=True)
    number("eval_stride_rate", 0, 1, low_open=True)
    for key in ("eval_scale_array", "train_scale_array"):
        value = C.get(key, [1])
        if (not isinstance(value, (list, tuple)) or not value
                or not all(_is_number(x) and math.isfinite(x) and x > 0 for x in value)):
            fail(key, "a non-empty list of positive numbers", f"e.g. --set {key}=[1.0]")
    for key in ("train_label_pad", "eval_label_pad"):
        value = _get(C, key)
        if value is not _MISSING and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= 255):
            fail(key, "an integer in 0..255", "255 = ignored, 0 = background (U2PL)")
    value = _get(C, "voc_train_folder")
    if value is not _MISSING and value is not None and (not isinstance(value, str)
                                                        or not value.strip()):
        fail("voc_train_folder", "none or a folder name under dataset_path",
             "e.g. --set voc_train_folder=train_aug")
    if C.get("train_scale_mode") == "u2pl" and not (
            min(C.train_scale_array) <= 1 <= max(C.train_scale_array)):
        fail("train_scale_array", "a list whose min <= 1 <= max with train_scale_mode='u2pl'",
             "U2PL draws from [min, 1) and [1, max); e.g. --set train_scale_array=[0.5,2.0]")
    single = {"center_pad", "resize"} & {C.get("eval_mode"), C.get("val_eval_mode")}
    if single and [float(x) for x in C.eval_scale_array] != [1.0]:
        fail("eval_scale_array", f"[1] with eval_mode='{sorted(single)[0]}'",
             "that protocol is single-scale; --set eval_scale_array=[1]")
    if C.get("eval_crf") is True:
        if C.get("eval_average") != "logits" or {C.get("eval_mode"), C.get("val_eval_mode")} \
                & {"center_pad", "resize"}:
            fail("eval_crf", "false unless eval_average='logits' and eval_mode (and "
                 "val_eval_mode) is 'whole' or 'slide'", "the CRF's unary is the softmax of "
                 "the averaged logits of the full image; --set eval_average=logits "
                 "eval_mode=whole")
        from .eval.crf import require_densecrf   # the optional package: say so now, not later
        require_densecrf("eval_crf")
    for key in ("eval_class_mask", "eval_crf"):
        value = _get(C, key)
        if value is not _MISSING and not isinstance(value, bool):
            fail(key, "true or false")
    for key in ("image_mean", "image_std"):
        value = C.get(key, [0, 0, 1])
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(_is_number(x) and math.isfinite(x) for x in value)
                or (key == "image_std" and not all(x > 0 for x in value))):
            fail(key, "3 finite numbers" + (" > 0" if key == "image_std" else ""))
    value = C.get("cutmix_mask_prop_range", [0, 1])
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(_is_number(x) and 0 <= x <= 1 for x in value) or value[0] > value[1]):
        fail("cutmix_mask_prop_range", "[low, high] with 0 <= low <= high <= 1")
    for key in ("eval_source", "split_dir", "log_dir"):
        if key in C and (not isinstance(C[key], str) or not C[key].strip()):
            fail(key, "a non-empty path")
    if "image_labels" in C and (not isinstance(C.image_labels, str)
                                or not C.image_labels.strip()):
        fail("image_labels", "'masks' or the path of an image-label list",
             "'masks' derives each image's classes from its label PNG; a list file has lines "
             "'<id> <c1> <c2> ...' (relative to dataset_path or absolute)")
    for group in _option_groups():
        if group.check is not None and isinstance(C.get(group.name), Mapping):
            group.check(C)


_MISSING = object()


def _get(C: Config, key: str) -> Any:
    """The value of a dotted key, or _MISSING (keys a config does not have are not checked)."""
    node = C
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def engine_log_level(env: Optional[Mapping[str, str]] = None) -> int:
    """The logging level named by ``ENGINE_LOGGING_LEVEL`` (a level name or number; default
    INFO), or ConfigError naming the variable and the accepted values."""
    env = os.environ if env is None else env
    text = (env.get("ENGINE_LOGGING_LEVEL") or "INFO").strip()
    if text.isdigit():
        return int(text)
    if text.upper() in _LEVELS:
        return getattr(logging, text.upper())
    raise ConfigError(f"ENGINE_LOGGING_LEVEL={text!r} is not a logging level; use one of "
                      f"{', '.join(_LEVELS)} (or unset it)")


def _list_counts(C: Config) -> Optional[tuple]:
    """(labelled, unlabelled) entries (non-blank lines) of the train lists, or None when
    either list file is missing or unreadable (the data layer reports that later)."""
    counts = []
    for source in (C.train_source, C.unsup_source):
        path = Path(source)
        if not path.is_absolute():
            path = Path(C.dataset_path) / source
        try:
            with open(path, encoding="utf-8-sig") as f:
                counts.append(sum(1 for line in f if line.strip()))
        except (OSError, UnicodeDecodeError):
            return None
    return tuple(counts)


def _unnest(path: str, probe: str) -> str:
    """The CPS VOC archive unpacks to pascal_voc/pascal_voc; accept either level."""
    p = Path(path)
    inner = p / p.name
    if not (p / probe).exists() and (inner / probe).exists():
        return str(inner)
    return str(p)


def load_config(exp_dir: os.PathLike, overrides: Iterable[str] = (),
                env: Optional[Mapping[str, str]] = None, preset: Iterable[str] = ()) -> Config:
    """Load ``<exp_dir>/config.py`` (its ``config`` object), apply env and ``--set``, finalize.

    ``preset``: ``key=value`` strings applied before the environment and ``--set`` (the switches
    of a script such as trainal.py), so that the command line still has the last word.
    """
    env = os.environ if env is None else env
    path = Path(exp_dir) / "config.py"
    if not path.is_file():
        raise ConfigError(f"no experiment config at {path}; each experiment folder needs a "
                          "config.py defining `config` (see exp_voc/config.py)")
    spec = importlib.util.spec_from_file_location(f"_exp_config_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "config", None), Config):
        raise ConfigError(f"{path} must define `config = ...` as a furnace.config.Config")
    C = copy.deepcopy(module.config)
    apply_overrides(C, preset)
    apply_env(C, env)
    apply_overrides(C, overrides)
    return finalize(C, exp_dir=path.parent)


#: Keys that decide which network a checkpoint holds, besides every method option group
#: (``dueb``, ``u2pl``, ..., and the old names of their keys): eval.py takes them from the
#: checkpoint.
NETWORK_KEYS = ("method", "num_classes", "class_names", "backbone", "stem", "output_stride",
                "head_channels", "backbone_width", "bn_eps", "bn_momentum")
#: The validation protocol a run used: eval.py's default is the checkpoint's.
PROTOCOL_KEYS = ("eval_mode", "eval_crop_size", "eval_stride_rate", "eval_scale_array",
                 "eval_flip", "eval_branch", "eval_average", "eval_label_pad", "image_mean",
                 "image_std", "eval_resize", "eval_class_mask", "eval_crf", "eval_absent_iou")


def checkpoint_config(C: Config, recorded: Any, overrides: Iterable[str] = (),
                      protocol: bool = True, source: str = "the checkpoint") -> Config:
    """The config to evaluate a checkpoint with: the folder's finalised ``C`` with the
    network keys (:data:`NETWORK_KEYS` and every method option group) of the config the
    checkpoint recorded, and with ``protocol`` its validation protocol (:data:`PROTOCOL_KEYS`);
    then ``overrides`` (``--set``) again, so the command line has the last word. Data paths
    and lists stay the folder's. ``recorded``: the checkpoint's ``config`` dict (None for
    reference and older files: ``C`` unchanged). A recorded config of an older version that
    has a group's keys under their old top-level names (``unsup_weight``, ``aleatoric``, ...)
    sets the group's keys."""
    if not isinstance(recorded, Mapping):
        return C
    C = copy.deepcopy(C)
    keys = NETWORK_KEYS + (PROTOCOL_KEYS if protocol else ())
    _overlay(C, {k: v for k, v in recorded.items() if k in keys or _in_group(C, k)})
    apply_overrides(C, overrides)
    try:
        validate(C)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return C


def _in_group(C: Config, key: str) -> bool:
    """``key`` is a group of ``C`` or the old name of a group's key."""
    return isinstance(C.get(key), Config) or canonical_key(C, key) != key


def _overlay(C: Config, recorded: Mapping[str, Any]) -> None:
    """Set every key of ``C`` (groups recursively) that ``recorded`` has; old names set the
    keys they stand for."""
    for key, value in recorded.items():
        if key not in C:
            continue                      # a key this version no longer has
        if isinstance(C[key], Config):
            if isinstance(value, Mapping):
                _overlay(C[key], value)
        else:
            C[key] = copy.deepcopy(value)


def add_config_arguments(parser) -> None:
    """Add ``--set key=value ...`` to an argparse parser."""
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE",
                        help="override config keys, e.g. --set batch_size=4 backbone=resnet18")
