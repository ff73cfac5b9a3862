"""Data: datasets for the CPS VOC/Cityscapes layouts, training transforms, CutMix masks,
loaders, the split tool and the procedural demo dataset."""
from .datasets import (DataError, SegmentationDataset, VOCDataset, CityscapesDataset,
                       build_dataset, build_train_dataset, build_eval_dataset,
                       train_transform_from_config, read_image, read_label, read_list_file,
                       check_label_values, resolve_source, voc_folder_for_list, canonical_layout)
from .transforms import TrainTransform, IGNORE_INDEX, normalize
from .cutmix import BoxMaskGenerator, MaskCollate, mask_generator_from_config, seg_collate
from .loader import (DUEB_STREAMS, StreamSpec, TrainLoaders, cutmix_collate,
                     EpochTaggedSampler, make_loader, worker_init_fn, per_process_batch)
from .palettes import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, VOC_CLASSES, VOC_PALETTE,
                       voc_palette, default_class_names, default_palette)

# splits and demo are also run as `python -m furnace.data.<name>`; importing them lazily keeps
# runpy from warning that the module was imported before being executed.
_LAZY = {"make_splits": "splits", "write_splits": "splits",
         "DEMO_CLASSES": "demo", "ensure_demo_data": "demo"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DataError", "SegmentationDataset", "VOCDataset", "CityscapesDataset", "build_dataset",
    "build_train_dataset", "build_eval_dataset", "train_transform_from_config", "read_image",
    "read_label", "read_list_file", "check_label_values", "resolve_source",
    "voc_folder_for_list", "canonical_layout", "TrainTransform", "IGNORE_INDEX", "normalize",
    "BoxMaskGenerator", "MaskCollate", "mask_generator_from_config", "seg_collate",
    "DUEB_STREAMS", "StreamSpec", "cutmix_collate", "TrainLoaders", "EpochTaggedSampler",
    "make_loader", "worker_init_fn",
    "per_process_batch", "make_splits", "write_splits", "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE", "VOC_CLASSES", "VOC_PALETTE", "voc_palette", "default_class_names",
    "default_palette", "DEMO_CLASSES", "ensure_demo_data",
]
