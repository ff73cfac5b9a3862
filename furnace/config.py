"""Experiment configuration: defaults, environment and command-line overrides, derived values.

An experiment folder (``exp_voc/``, ``exp_city/``, ``exp_demo/``) holds a ``config.py`` that
builds a :class:`Config` from :func:`base_config` and sets its dataset's values; users edit it.
Scripts load it with :func:`load_config`, which applies, in order:

1. the environment variables of the reference code (``volna``, ``snapshot_dir``,
   ``learning_rate``, ``batch_size``, ``snapshot_iter``, ``debug``),
2. ``--set key=value`` overrides from the command line (nested keys as ``aleatoric.per_pixel``),
3. derived values (split file names, image counts, iterations per epoch, OHEM ``min_kept``,
   log and snapshot paths), recomputed after the overrides unless a key was set explicitly.

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
from typing import Any, Iterable, Mapping, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the fix."""


class Config(dict):
    """A dict with attribute access (``C.lr`` is ``C['lr']``); nested Configs for sub-options."""

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

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        """Plain nested dicts (for checkpoints and logs)."""
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


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


# Keys restricted to a set of values.
CHOICES = {
    "dataset": ("voc", "city"),
    "backbone": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "stem": ("deep", "classic"),
    "output_stride": (8, 16),
    "eval_branch": (1, 2, "mean"),
    "eval_mode": ("slide", "whole", "center_pad"),
    "val_eval_mode": (None, "slide", "whole", "center_pad"),
    "eval_average": ("sum", "logits"),
    "train_scale_mode": ("choice", "u2pl"),
    "amp": ("auto", "off", "bf16", "fp16"),
    "sup_loss": ("ce", "ohem"),
}

# Keys whose value may be None or a string.
OPTIONAL_STR = ("onehot", "pretrained_model", "class_names", "train_source", "unsup_source",
                "snapshot_dir", "device", "voc_train_folder")
# Keys whose value may be None or an int (derived when None).
OPTIONAL_INT = ("num_train_imgs", "num_unsup_imgs", "max_samples", "niters_per_epoch",
                "ohem_min_kept", "snapshot_keep", "snapshot_from", "stop_after_epoch",
                "num_queries", "num_negatives", "reference_gpus")
# Keys whose value may be None or a number.
OPTIONAL_FLOAT = ("contrastive_weight",)


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
    C.background = 0
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
    # train_scale_array (U2PL: [0.5, 2.0]), size int(h*s) x int(w*s)
    C.train_scale_mode = "choice"
    C.train_label_pad = 255                    # label of the crop padding (U2PL: 0)
    # CutMix (REFERENCE 3.5)
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
    # losses
    C.sup_loss = "ce"                          # 'ce' (VOC) or 'ohem' (Cityscapes)
    C.ohem_thresh = 0.7
    C.ohem_min_kept_per_image = 50000          # min_kept = this * batch per process
    C.ohem_min_kept = None
    C.ohem_class_weight = False                # True: the 19 Cityscapes class weights
    C.unsup_weight = 1.0
    # start_iter: global iteration from which the aleatoric terms are added (0: from the
    # first, as the reference). While the clean CE L0 is above about 1 (a network trained from
    # scratch, early on), the faithful A pushes L0 up (its gradient on L0 is
    # 1 + M - L0 * mean_t ELU'(d_t), negative there), so from-scratch runs start it later.
    C.aleatoric = Config(enabled=True, samples=10, learn_variance=False, per_pixel=False,
                         sup_weight=0.5, unsup_weight=1.0, start_iter=0)
    C.energy = Config(enabled=True, sup_weight=0.5, unsup_weight=1.0)
    # the method the engine trains (furnace/methods/: dueb, supervised, ...); DUEB's options
    # are C.dueb.aleatoric / C.dueb.energy, the same groups as the legacy C.aleatoric / C.energy
    C.method = "dueb"
    C.dueb = Config(aleatoric=C.aleatoric, energy=C.energy)
    C.supervised_only = False                  # legacy: True selects method 'supervised'
    # U2PL (methods u2pl and u2pl_suponly, spec methods/U2PL.md); defaults = its VOC code
    C.u2pl = Config(
        sup_only_epoch=1,              # warm-start epochs: student only, teacher BN passes
        ema_decay=0.99,                # teacher = EMA of the student's parameters
        head_lr_mult=10.0,             # decoder (+ aux) lr = lr x this (Cityscapes code: 1)
        rep_head=True, rep_dim=256,    # representation head (SupOnly: no head)
        aux_weight=0.0,                # > 0: auxiliary head on layer3 (Cityscapes: 0.4)
        ohem_min_kept=100000,          # per reference group (GPU), as the reference (ohem)
        cutmix_prob=0.5,               # one draw per step: CutMix the whole batch or not
        drop_percent=80.0,             # percent of unlabelled pixels kept at epoch 0
        unsup_weight=1.0,              # eta
        unsup_weight_mode="reference",  # 'reference': x 1/kept-fraction; 'mean': plain mean
        contrastive="reference",       # 'reference' (the code), 'paper' (Eqs. 14-15), 'off'
        contrastive_weight=None,       # None: reference 1/reference_gpus, paper 0.1
        onehot=None,                   # None: reference 'union' (label_onehot), paper 'exact'
        low_entropy_threshold=20.0,    # alpha_0 (percent) of the anchor/negative masks
        low_rank=3, high_rank=20,      # negatives: the teacher ranks c in [low, high)
        delta_p=0.3, delta_n=1.0,      # anchor / negative probability thresholds
        num_queries=None,              # anchors per class; None: reference 256, paper 50
        num_negatives=None,            # keys per anchor; None: reference 50, paper 256
        temperature=0.5,
        queue_size_first=50000, queue_size=30000,  # class 0's queue and the others'
        save_queues=True,              # checkpoint the queues (the reference does not)
    )
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
    C.fuse_passes = False
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
    # 'slide' windows, 'whole' image, or 'center_pad': U2PL's VOC val (pad/centre-crop to
    # eval_crop_size, one forward, mIoU over the crop; single scale)
    C.eval_mode = "slide"
    # eval_mode of the validation during training (None: eval_mode); U2PL's Cityscapes code
    # validates on the central crop (center_pad) and keeps the best by that number
    C.val_eval_mode = None
    C.eval_average = "sum"                     # windows' logits 'sum' (CPS) or 'logits' mean (U2PL)
    C.eval_label_pad = 255                     # center_pad: label of the padding (U2PL: 0)
    C.eval_batch_windows = 4
    return C


# ----------------------------------------------------------------------------- overrides

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_value(key: str, text: str, current: Any, source: str) -> Any:
    """Parse ``text`` into the type of ``current`` (the default) or raise ConfigError."""
    leaf = key.rsplit(".", 1)[-1]

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {text!r} (from {source})")

    low = text.strip().lower()
    if leaf in CHOICES:
        allowed = CHOICES[leaf]
        for a in allowed:
            if low == str(a).lower():
                return a
        raise bad("one of " + ", ".join(map(str, allowed)))
    if low in ("none", "null") and (current is None
                                    or leaf in OPTIONAL_STR + OPTIONAL_INT + OPTIONAL_FLOAT):
        return None
    if isinstance(current, bool):
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad("a boolean (true/false)")
    if isinstance(current, int) or leaf in OPTIONAL_INT:
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(current, float) or leaf in OPTIONAL_FLOAT:
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
    """Return (parent Config, leaf name) for a dotted key, or raise for unknown keys."""
    parts = key.split(".")
    node = C
    for i, part in enumerate(parts):
        if not isinstance(node, Config) or part not in node:
            known = sorted(node) if isinstance(node, Config) else []
            hint = difflib.get_close_matches(part, known, n=3)
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
    """Set a (possibly dotted) key from its text form, checking name and type."""
    parent, leaf = _lookup(C, key, source)
    parent[leaf] = _parse_value(key, text, parent[leaf], source)


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


def validate(C: Config) -> None:
    """Raise ConfigError for values that would fail later in the run (after hours of training,
    or as a traceback): counts, rates, scale lists, paths. ``C`` is a finalised config."""
    def fail(key: str, want: str, fix: str = "") -> None:
        raise ConfigError(f"config key '{key}' must be {want}, got {_get(C, key)!r}"
                          + (f"; {fix}" if fix else ""))

    def integer(key: str, low: int, optional: bool = False, fix: str = "") -> None:
        v = _get(C, key)
        if v is _MISSING or (optional and v is None):
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            fail(key, f"an integer >= {low}" + (" or none" if optional else ""), fix)

    def number(key: str, low: float, high: float = math.inf, low_open: bool = False,
               fix: str = "") -> None:
        v = _get(C, key)
        if v is _MISSING:
            return
        ok = _is_number(v) and math.isfinite(v) and v <= high and (v > low if low_open
                                                                    else v >= low)
        if not ok:
            rng = f"({low}" if low_open else f"[{low}"
            fail(key, f"a finite number in {rng}, {high}]" if high < math.inf else
                 f"a finite number {'>' if low_open else '>='} {low}", fix)

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
    integer("aleatoric.samples", 1)
    integer("aleatoric.start_iter", 0)
    number("lr", 0, low_open=True, fix="e.g. --set lr=0.005")
    number("lr_power", 0)
    number("momentum", 0, 1)
    number("weight_decay", 0)
    number("unsup_weight", 0)
    number("bn_eps", 0, low_open=True)
    number("bn_momentum", 0, 1)
    number("ohem_thresh", 0, 1, low_open=True)
    number("eval_stride_rate", 0, 1, low_open=True)
    for group in ("aleatoric", "energy"):
        for key in ("sup_weight", "unsup_weight"):
            number(f"{group}.{key}", 0)
    integer("u2pl.sup_only_epoch", 0)
    integer("u2pl.rep_dim", 1)
    integer("u2pl.ohem_min_kept", 1)
    integer("u2pl.low_rank", 0)
    integer("u2pl.high_rank", 1)
    integer("u2pl.num_queries", 1, optional=True)
    integer("u2pl.num_negatives", 1, optional=True)
    integer("u2pl.queue_size_first", 1)
    integer("u2pl.queue_size", 1)
    number("u2pl.ema_decay", 0, 1)
    number("u2pl.head_lr_mult", 0, low_open=True)
    number("u2pl.aux_weight", 0)
    number("u2pl.cutmix_prob", 0, 1)
    number("u2pl.drop_percent", 0, 100, low_open=True)
    number("u2pl.unsup_weight", 0)
    number("u2pl.low_entropy_threshold", 0, 50)
    number("u2pl.temperature", 0, low_open=True)
    if _get(C, "u2pl.contrastive_weight") is not None:
        number("u2pl.contrastive_weight", 0)
    v = _get(C, "u2pl.onehot")
    if v is not _MISSING and v not in (None, "union", "exact"):
        fail("u2pl.onehot", "none, 'union' or 'exact'",
             "union: the reference's one-hot (image 0 holds the batch's labels)")
    for key, allowed in (("u2pl.contrastive", ("reference", "paper", "off")),
                         ("u2pl.unsup_weight_mode", ("reference", "mean"))):
        v = _get(C, key)
        if v is not _MISSING and v not in allowed:
            fail(key, f"one of {allowed}")
    for key in ("eval_scale_array", "train_scale_array"):
        v = C.get(key, [1])
        if (not isinstance(v, (list, tuple)) or not v
                or not all(_is_number(x) and math.isfinite(x) and x > 0 for x in v)):
            fail(key, "a non-empty list of positive numbers", f"e.g. --set {key}=[1.0]")
    for key in ("train_label_pad", "eval_label_pad"):
        v = _get(C, key)
        if v is not _MISSING and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v <= 255):
            fail(key, "an integer in 0..255", "255 = ignored, 0 = background (U2PL)")
    v = _get(C, "voc_train_folder")
    if v is not _MISSING and v is not None and (not isinstance(v, str) or not v.strip()):
        fail("voc_train_folder", "none or a folder name under dataset_path",
             "e.g. --set voc_train_folder=train_aug")
    if C.get("train_scale_mode") == "u2pl" and not (
            min(C.train_scale_array) <= 1 <= max(C.train_scale_array)):
        fail("train_scale_array", "a list whose min <= 1 <= max with train_scale_mode='u2pl'",
             "U2PL draws from [min, 1) and [1, max); e.g. --set train_scale_array=[0.5,2.0]")
    if "center_pad" in (C.get("eval_mode"), C.get("val_eval_mode")) and [
            float(x) for x in C.eval_scale_array] != [1.0]:
        fail("eval_scale_array", "[1] with eval_mode='center_pad'",
             "that protocol is single-scale; --set eval_scale_array=[1]")
    for key in ("image_mean", "image_std"):
        v = C.get(key, [0, 0, 1])
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(_is_number(x) and math.isfinite(x) for x in v)
                or (key == "image_std" and not all(x > 0 for x in v))):
            fail(key, "3 finite numbers" + (" > 0" if key == "image_std" else ""))
    v = C.get("cutmix_mask_prop_range", [0, 1])
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(_is_number(x) and 0 <= x <= 1 for x in v) or v[0] > v[1]):
        fail("cutmix_mask_prop_range", "[low, high] with 0 <= low <= high <= 1")
    for key in ("eval_source", "split_dir", "log_dir"):
        if key in C and (not isinstance(C[key], str) or not C[key].strip()):
            fail(key, "a non-empty path")
    _check_combinations(C)


def _check_combinations(C: Config) -> None:
    """Cross-key checks: combinations that would silently turn a method into another one."""
    u = C.get("u2pl")
    if isinstance(u, Mapping) and C.get("method") == "u2pl":
        if _is_number(u.get("sup_only_epoch")) and u["sup_only_epoch"] >= C.nepochs:
            raise ConfigError(
                f"config key 'u2pl.sup_only_epoch' is {u['sup_only_epoch']} but nepochs is "
                f"{C.nepochs}: no epoch would learn from unlabelled data, a supervised run "
                "logged as U2PL; lower u2pl.sup_only_epoch below nepochs (or train "
                "method=u2pl_suponly for the supervised baseline)")
    if isinstance(u, Mapping) and str(C.get("method", "")).startswith("u2pl") \
            and u.get("contrastive") != "off":
        low, high = u.get("low_rank"), u.get("high_rank")
        if _is_number(low) and _is_number(high) and low >= high:
            raise ConfigError(
                f"config keys 'u2pl.low_rank'={low} and 'u2pl.high_rank'={high}: negatives are "
                "the classes ranked in [low_rank, high_rank), an empty range; set low_rank < "
                "high_rank (U2PL: 3 and 20), or u2pl.contrastive=off")
        if _is_number(low) and low >= C.num_classes:
            raise ConfigError(
                f"config key 'u2pl.low_rank' is {low} but num_classes is {C.num_classes}: no "
                "class ranks that low, so no unlabelled pixel is a negative; set "
                "u2pl.low_rank < num_classes")


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
#: (``dueb``, ``aleatoric``, ``energy``, ``u2pl``, ...): eval.py takes them from the checkpoint.
NETWORK_KEYS = ("method", "supervised_only", "num_classes", "class_names", "backbone", "stem",
                "output_stride", "head_channels", "backbone_width", "bn_eps", "bn_momentum")
#: The validation protocol a run used: eval.py's default is the checkpoint's.
PROTOCOL_KEYS = ("eval_mode", "eval_crop_size", "eval_stride_rate", "eval_scale_array",
                 "eval_flip", "eval_branch", "eval_average", "eval_label_pad", "image_mean",
                 "image_std")


def checkpoint_config(C: Config, recorded: Any, overrides: Iterable[str] = (),
                      protocol: bool = True, source: str = "the checkpoint") -> Config:
    """The config to evaluate a checkpoint with: the folder's finalised ``C`` with the
    network keys (:data:`NETWORK_KEYS` and every method option group) of the config the
    checkpoint recorded, and with ``protocol`` its validation protocol (:data:`PROTOCOL_KEYS`);
    then ``overrides`` (``--set``) again, so the command line has the last word. Data paths
    and lists stay the folder's. ``recorded``: the checkpoint's ``config`` dict (None for
    reference and older files: ``C`` unchanged)."""
    if not isinstance(recorded, Mapping):
        return C
    C = copy.deepcopy(C)
    keys = NETWORK_KEYS + (PROTOCOL_KEYS if protocol else ())
    _overlay(C, {k: v for k, v in recorded.items()
                 if k in keys or isinstance(C.get(k), Config)})
    apply_overrides(C, overrides)
    try:
        validate(C)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return C


def _overlay(C: Config, recorded: Mapping[str, Any]) -> None:
    """Set every key of ``C`` (groups recursively) that ``recorded`` has."""
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
