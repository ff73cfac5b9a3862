"""Torch-free facts about the built-in methods: their presets and the config's method name,
so that ``--help`` and ``--print-config`` answer without importing torch."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

from ..config import ConfigError, data_root


def _dueb(aleatoric: bool, energy: bool) -> List[str]:
    return [f"dueb.aleatoric.enabled={aleatoric}", f"dueb.energy.enabled={energy}",
            "dueb.supervised_only=False"]


# U2PL's training and evaluation settings (spec methods/U2PL.md sections 4 to 6): ResNet-101
# at output stride 8 (its network always is), SGD with the decoder at 10x (VOC) or 1x
# (Cityscapes), U2PL's random scale and label-0 crop padding, its evaluation protocols
# (VOC: centre-padded 513 crops, padding labelled background; Cityscapes: 769 windows at
# stride 513, logits averaged), validation after every epoch, in fp32. Batch 16 is the
# global batch of each stream, computed as the reference's GPUs computed it (reference_gpus,
# spec 10.2): VOC 4 groups of 4 + 4, Cityscapes 8 groups of 2 + 2 (SupOnly the same).
_U2PL_COMMON = ["backbone=resnet101", "stem=deep",
                # the CPS v1c file; U2PL's own resnet101.pth has the same keys
                "pretrained_model=" + data_root("pytorch-weight", "resnet101_v1c.pth"),
                "train_scale_mode=u2pl",
                "train_label_pad=0", "eval_every=1", "eval_scale_array=[1]",
                "eval_flip=False", "head_channels=256", "batch_size=16"]
U2PL_VOC = _U2PL_COMMON + [
    "lr=0.001", "weight_decay=0.0001", "nepochs=80", "image_height=513", "image_width=513",
    "reference_gpus=4",
    "sup_loss=ce", "u2pl.head_lr_mult=10.0", "u2pl.sup_only_epoch=1", "u2pl.aux_weight=0.0",
    "eval_mode=center_pad", "eval_crop_size=513", "eval_label_pad=0"]
U2PL_CITY = _U2PL_COMMON + [
    "lr=0.01", "weight_decay=0.0005", "nepochs=200", "image_height=769", "image_width=769",
    "reference_gpus=8",
    "sup_loss=ohem", "ohem_thresh=0.7", "ohem_class_weight=False", "u2pl.ohem_min_kept=100000",
    "u2pl.head_lr_mult=1.0", "u2pl.sup_only_epoch=0", "u2pl.aux_weight=0.4",
    "eval_mode=slide", "eval_crop_size=769", "eval_stride_rate=0.6666666666666666",
    "eval_average=logits",
    # validation during training: the central 769 crop, one forward (spec 10.6)
    "val_eval_mode=center_pad"]
# the demo keeps its own budget, data and lr (the same as every other demo-table row); the
# decoder lr is not multiplied (its lr was chosen for a decoder at 1x); its batch of 8 + 8 is
# two reference groups of 4 + 4, the batch of a VOC reference GPU
U2PL_DEMO = ["u2pl.head_lr_mult=1.0", "reference_gpus=2"]

# ELN's settings (spec methods/ELN.md 4 and 6): torchvision-layout ResNet (classic stem) at
# output stride 16 with the V1 ImageNet weights, the ELN's ResNet-34 from torchvision's
# resnet34 file, AdamW at a constant 1e-4 (backbones 1e-5), weight decay 1e-5, fp16 with one
# GradScaler, epochs of 266 iterations, 500 in all; the stages as the README's commands
# (eln.eln_epoch = --pre_epoch + --eln_epoch); one reference GPU: 6 + 6 (VOC), 4 + 4
# (Cityscapes), per-GPU BatchNorm.
_ELN_COMMON = ["stem=classic", "output_stride=16", "head_channels=256", "backbone_width=64",
               "lr=0.0001", "weight_decay=1e-05", "nepochs=500", "niters_per_epoch=266",
               "amp=fp16", "reference_gpus=1", "eval_every=1", "eval_scale_array=[1]",
               "eval_flip=False", "eval_mode=whole",
               "eln.eln_pretrained=" + data_root("pytorch-weight", "resnet34-333f7ec4.pth")]
ELN_VOC = _ELN_COMMON + [
    "backbone=resnet101",
    "pretrained_model=" + data_root("pytorch-weight", "resnet101-5d3b4d8f.pth"),
    "batch_size=6", "image_height=505", "image_width=505",
    # a fixed 505 x 505 resize (aspect ratio ignored) and a flip; evaluated on the image and
    # the ground truth resized alike
    "train_scale_mode=resize", "eval_mode=resize", "eval_crop_size=505",
    "eln.pre_epoch=70", "eln.eln_epoch=120",
    # checkpoints as the reference's: stage-3 epochs e % 10 == 0 (e > snapshot_from); of
    # those epoch files only the last 2 are kept (each is ~1.6 GiB with the teacher, the ELN,
    # both aux decoders and AdamW's moments: all 39 would take ~61 GiB; snapshot_keep=none
    # keeps them as the reference does); epoch-last.pth and best*.pth stay
    "snapshot_iter=10", "snapshot_from=119", "snapshot_keep=2"]
ELN_CITY = _ELN_COMMON + [
    "backbone=resnet50",
    "pretrained_model=" + data_root("pytorch-weight", "resnet50-19c8e357.pth"),
    "batch_size=4", "image_height=512", "image_width=1024",
    # a 512 x 1024 crop from the full resolution, no scaling; the whole 1024 x 2048 image
    "train_scale_array=[1]", "train_scale_mode=choice",
    "eln.pre_epoch=100", "eln.eln_epoch=158", "snapshot_iter=10", "snapshot_from=157",
    "snapshot_keep=2"]   # ~1.3 GiB per epoch file, 35 would take ~45 GiB (as VOC's)
# the demo keeps its budget and data; 4 epochs = one of stage 1, one of stage 2, two of
# stage 3; its 64 x 64 crops give 16 x 16 maps at stride 4, so 8 x 8 contrastive windows; no
# ImageNet weights, so a higher AdamW lr; batch 8 + 8 as two reference groups of 4 + 4
ELN_DEMO = ["stem=classic", "lr=0.001", "weight_decay=1e-05", "reference_gpus=2",
            "eln.pre_epoch=1", "eln.eln_epoch=2", "eln.window_size=8",
            "eln.eln_pretrained=none"]

# LPL's settings (spec methods/LPL.md 2, 5, 7 and run.py): DeepLabv3+ ResNet-101 (deep stem,
# output stride 8 with PyTorch-Encoding's dilations: LPL's network always is) on the CPS v1c
# file (the reference loads PyTorch-Encoding's resnet101s, same keys: record which), SGD
# (backbone, head, cls_conv at 1, 1, 10), weight decay 4e-5 on every parameter, fp16 with one
# GradScaler, 384 crops. Stage 1: 5 strong + 5 weak images, 20000 iterations (10 epochs of
# 2000; the reference's epochs have 2116), lr 0.001 (HybridNet poly, PseudoNet constant);
# stage 2: batch 16, lr 0.007, 30000 iterations, one fixed order. The lists: LPL's first-N
# subsets of VOC train.txt and the ordered list of all 10582 (python -m
# furnace.data.lpl_splits, exp_voc/splits_lpl/README.md). Tested as the reference tests:
# the whole image at 5 scales + flip, the normalised image resized bicubically, logits
# averaged; stage 1 restricted to the val image's classes (the oracle protocol), an absent
# class counted as IoU 0; stage 2 with DenseCRF (optional package pydensecrf2).
_LPL_COMMON = ["backbone=resnet101", "stem=deep", "output_stride=8", "head_channels=256",
               "backbone_width=64",
               "pretrained_model=" + data_root("pytorch-weight", "resnet101_v1c.pth"),
               "momentum=0.9", "weight_decay=4e-05", "lr_power=0.9", "amp=fp16",
               "image_height=384", "image_width=384", "num_workers=2",
               # LPL's list names do not say 'train': read the train_aug folder
               "voc_train_folder=train_aug",
               "eval_mode=whole", "eval_average=logits", "eval_resize=normalized_cubic",
               "eval_scale_array=[0.5,0.75,1.0,1.25,1.5]", "eval_flip=True",
               "eval_absent_iou=zero"]
LPL_VOC = _LPL_COMMON + [
    "lr=0.001", "batch_size=5", "nepochs=10", "niters_per_epoch=2000",
    "train_source=splits_lpl/lpl_labeled_92.txt", "unsup_source=splits_lpl/lpl_all.txt",
    "max_samples=10582", "image_labels=masks", "eval_class_mask=True", "eval_every=10",
    "snapshot_iter=1", "snapshot_keep=2"]
LPL_RETRAIN_VOC = _LPL_COMMON + [
    "lr=0.007", "batch_size=16", "nepochs=30", "niters_per_epoch=1000",
    "eval_class_mask=False", "eval_crf=True", "eval_every=30",
    "snapshot_iter=1", "snapshot_keep=2"]
# the demo keeps its budget, data, network and lr schedule (every demo-table row does); the
# strong half is its labelled list, the weak half every training image (labelled first)
_LPL_DEMO = ["voc_train_folder=train_aug", "output_stride=8", "momentum=0.9", "weight_decay=4e-05",
             "lpl.lr_mults=[1.0,1.0,1.0]"]
LPL_DEMO = _LPL_DEMO + ["train_source=lpl_labeled.txt", "unsup_source=lpl_all.txt",
                        "image_labels=masks", "eval_class_mask=True"]
LPL_RETRAIN_DEMO = _LPL_DEMO + ["eval_class_mask=False"]

#: method -> preset -> key=value strings (train.py, trainal.py, traine.py, traincpcl.py)
BUILTIN_PRESETS: Dict[str, Mapping[str, List[str]]] = {
    "dueb": {"full": _dueb(True, True), "aleatoric": _dueb(True, False),
             "energy": _dueb(False, True), "cpcl": _dueb(False, False)},
    "supervised": {},
    # U2PL's settings per experiment folder (spec methods/U2PL.md 4 and 6): scripts
    # exp_*/trainu2pl.py and trainu2pl_suponly.py pick the folder's preset
    "u2pl": {"voc": U2PL_VOC, "city": U2PL_CITY, "demo": U2PL_DEMO},
    "u2pl_suponly": {"voc": U2PL_VOC, "city": U2PL_CITY, "demo": U2PL_DEMO},
    "eln": {"voc": ELN_VOC, "city": ELN_CITY, "demo": ELN_DEMO},
    # LPL (spec methods/LPL.md): no Cityscapes experiment in the reference
    "lpl": {"voc": LPL_VOC, "demo": LPL_DEMO},
    "lpl_retrain": {"voc": LPL_RETRAIN_VOC, "demo": LPL_RETRAIN_DEMO},
}


def method_name(C) -> str:
    """The method a config asks for. The legacy switch ``dueb.supervised_only=True`` (old
    name ``supervised_only``, kept for old configs and scripts) selects the ``supervised``
    method when ``method`` is ``dueb``."""
    name = C.get("method", "dueb")
    if name == "dueb" and (C.get("dueb") or {}).get("supervised_only"):
        return "supervised"
    return name


def presets_of(method: str) -> Mapping[str, List[str]]:
    """The presets of ``method`` (built-in ones without importing torch)."""
    if method in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[method]
    from .registry import get_method
    return get_method(method).presets


#: what a script that names no method trains (the older ``train_main(HERE)``), and the method
#: of checkpoints without a ``method`` key (the reference's and our format 1)
DEFAULT_SCRIPT = ("dueb", "full")
FORMAT1_METHOD = "dueb"


def run_folder(method: str, preset: Optional[str]) -> str:
    """Where a script's runs go, relative to the experiment folder (its ``log_dir``): DUEB's
    scripts keep the reference's ``log/``; every other method writes ``log/<method>-<preset>``
    (``log/<method>`` without a preset), so runs of two methods never share a snapshot folder.
    ``eval.py --run <method>-<preset>`` evaluates them."""
    if method == "dueb":
        return "log"
    return f"log/{method}-{preset}" if preset else f"log/{method}"


def script_overrides(method: Optional[str] = None, preset: Optional[str] = None) -> List[str]:
    """The key=value strings a train script applies before the environment and --set.

    ``method``/``preset``: a registered method and one of its presets (neither: DUEB's full
    preset, what train.py runs)."""
    if method is None:
        method, preset = DEFAULT_SCRIPT if preset is None else ("dueb", preset)
    out = [f"method={method}", f"log_dir={run_folder(method, preset)}"]
    if preset is not None:
        presets = presets_of(method)
        if preset not in presets:
            raise ConfigError(f"method '{method}' has no preset '{preset}'; known: "
                              f"{', '.join(sorted(presets)) or 'none'}")
        out += list(presets[preset])
    if method == "dueb" and "dueb.supervised_only=False" not in out:
        out.append("dueb.supervised_only=False")  # the script decides, not a legacy config key
    return out
