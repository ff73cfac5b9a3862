"""The datasets of LPL's two stage-1 streams (spec methods/LPL.md 3.1, 6.3, 6.4, 10.2 items 1-4).

- strong: the labelled list (``train_source``, the first N ids of D), strong pipeline; a
  dataset of length ``file_length`` whose index i reads list entry i mod N, so that one pass
  of the sampler over len(D) indices draws the multiset {i mod N : i < len(D)} of the
  reference (each labelled image floor(len(D)/N) or that + 1 times);
- weak: the full ordered list D (``unsup_source``: every training image, the labelled ones
  first), crop-only weak pipeline.

An item: ``data`` float32 [3,h,w]; ``label`` uint8 [h,w], the ground-truth crop of an image
of the labelled list and all 255 for any other image (the method never sees the ground truth of
an image outside the labelled list); ``category`` float32 [C], the image-level label of the
full image (config ``image_labels``: from its full label PNG before augmentation, or from a
list file); ``is_labelled`` bool, the id is in ``train_source``; ``fn``, ``n`` and the
per-sample seed key as the framework's training datasets (epoch-tagged indices make an item
independent of the loader workers). :func:`~furnace.data.cutmix.seg_collate` batches them to
data [B,3,h,w], label uint8 [B,h,w], category [B,C], is_labelled bool [B].

VOC layout (and the demo) only: on Cityscapes class 0 is road, and the reference's 255 -> 0
rule would mark it present in every image (spec 9, quirk 8).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .cutmix import SEED_KEY
from .datasets import (DataError, SegmentationDataset, _cfg, build_dataset, canonical_layout,
                       canonical_mode, check_root, resolve_source, split_key)
from .image_labels import (check_listed, image_labels_source, image_level_label,
                           read_image_label_list)
from .lpl_aug import strong_transform_from_config, weak_transform_from_config
from .transforms import IGNORE_INDEX


class LPLDataset(Dataset):
    """A list of images with image-level labels, a pipeline, and the labelled set.

    Args:
        base: the framework's dataset of the list (its entries and readers are used; built in a
            training mode, so every entry has a label path).
        transform: ``(img, label, rng) -> (float32 [3,h,w], uint8 [h,w] or None)``
            (:class:`~furnace.data.lpl_aug.StrongTransform` or ``WeakTransform``).
        labelled: the ids of the labelled list.
        num_classes: C.
        image_labels: {id: float32 [C]} from an image-label list, or None to derive each image's
            label from its full label PNG; ``image_labels_path``: that list (for messages).
        file_length: dataset length; index i reads list entry i mod n.
        seed, stream: the per-sample seed (seed, stream, epoch, index) as the framework's
            training datasets.
    """

    def __init__(self, base: SegmentationDataset, transform, labelled: Set[str],
                 num_classes: int, image_labels: Optional[Dict[str, np.ndarray]] = None,
                 image_labels_path: str = "", file_length: Optional[int] = None, seed: int = 0,
                 stream: int = 0):
        self.base = base
        self.transform = transform
        self.labelled = frozenset(labelled)
        self.num_classes = int(num_classes)
        self.image_labels = image_labels
        if image_labels is not None:
            check_listed(image_labels, ((e.fn, e.where) for e in base.entries),
                         image_labels_path)
        if file_length is not None and int(file_length) < 1:
            raise DataError(f"dataset length (max_samples) must be >= 1, got {file_length}")
        self.file_length = None if file_length is None else int(file_length)
        self.seed = int(seed)
        self.stream = int(stream)

    # -- size and names (as SegmentationDataset)
    @property
    def n(self) -> int:
        """Number of entries in the list file."""
        return self.base.n

    @property
    def entries(self):
        return self.base.entries

    @property
    def list_file(self) -> str:
        return self.base.list_file

    @property
    def names(self):
        return self.base.names

    def __len__(self) -> int:
        return self.file_length if self.file_length is not None else self.base.n

    def __repr__(self) -> str:
        return (f"LPLDataset(list={self.list_file!r}, n={self.n}, len={len(self)}, "
                f"labelled={sum(e.fn in self.labelled for e in self.entries)})")

    def list_index(self, idx: int) -> int:
        """The list entry dataset index ``idx`` reads: idx mod n (IndexError outside
        [-len, len))."""
        length = len(self)
        if idx < 0:
            idx += length
        if not 0 <= idx < length:
            raise IndexError(f"index {idx} out of range for dataset of length {length}")
        return idx % self.base.n

    def category(self, i: int, mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Image-level label (float32 [C]) of list entry i; ``mask``: its full label map when
        already read (labels from masks)."""
        e = self.entries[i]
        if self.image_labels is not None:
            return self.image_labels[e.fn]
        if mask is None:
            _, mask = self.base.load(i, with_label=True)
        return image_level_label(mask, self.num_classes, self.base.paths(i)[1] or e.where)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        idx, epoch = split_key(key)
        i = self.list_index(idx)
        e = self.entries[i]
        is_labelled = e.fn in self.labelled
        # the full mask is read for a labelled image (its crop is the label) and, with labels
        # from masks, for any image (its classes); it never leaves this function otherwise
        need_mask = is_labelled or self.image_labels is None
        img, mask = self.base.load(i, with_label=need_mask)
        if need_mask and mask is None:
            raise DataError(f"list entry {e.where} has no label file, but LPL reads it for the "
                            f"image-level label; give image_labels a list file")
        category = self.category(i, mask)
        if epoch is not None:
            seed = (self.seed & 0xFFFFFFFF, self.stream, epoch & 0xFFFFFFFF, idx)
            rng = np.random.default_rng(seed)
        else:
            seed = None
            # plain int index: draw from the global NumPy RNG (seeded per worker by PyTorch)
            rng = np.random.default_rng(np.random.randint(0, 2 ** 32, size=4, dtype=np.uint64))
        data, label = self.transform(img, mask if is_labelled else None, rng)
        if label is None:
            label = np.full(data.shape[1:], IGNORE_INDEX, dtype=np.uint8)
        out = {"data": torch.from_numpy(np.ascontiguousarray(data)),
               "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)),
               "category": torch.from_numpy(np.array(category, dtype=np.float32)),
               "is_labelled": bool(is_labelled), "fn": e.fn, "n": self.n}
        if seed is not None:
            out[SEED_KEY] = seed
        return out


def _list_dataset(C, key: str, transform, file_length: Optional[int], stream: int
                  ) -> SegmentationDataset:
    """The framework's VOC dataset of the list config key ``key`` (a training mode, so every
    entry carries its label path; the transform is LPL's)."""
    layout = canonical_layout(_cfg(C, "dataset", "voc"))
    if layout != "voc":
        raise DataError(f"dataset={_cfg(C, 'dataset')!r}: LPL's data layer supports the VOC "
                        f"layout (PASCAL VOC and the demo) only. On Cityscapes class 0 is road, "
                        f"and LPL's rule (255 -> 0, then every value present) would mark it in "
                        f"every image (spec methods/LPL.md 9, quirk 8); set dataset=voc")
    root = check_root(_cfg(C, "dataset_path", ""), layout)
    src = resolve_source(root, _cfg(C, key), key)
    return build_dataset("voc", root, src, "train", num_classes=_cfg(C, "num_classes"),
                         transform=transform, file_length=file_length,
                         seed=int(_cfg(C, "seed", 0)), stream=stream,
                         allow_outside_root=bool(_cfg(C, "allow_outside_root", False)),
                         voc_folder=_cfg(C, "voc_train_folder"))


def _strong(C):
    """The strong pipeline with K = ``lpl.augtime`` (the reference's DATA_AUGTIME, 2)."""
    group = _cfg(C, "lpl") or {}
    return strong_transform_from_config(C, int(group.get("augtime", 2)))


def lpl_dataset(C, source: str, transform, stream: int = 0,
                file_length: Optional[int] = None) -> LPLDataset:
    """LPLDataset over the list of ``source`` ('train': train_source, 'unlabeled':
    unsup_source) with ``transform``; the labelled set is train_source's ids, the image-level
    labels follow the config key image_labels."""
    key = "train_source" if canonical_mode(source) == "train" else "unsup_source"
    base = _list_dataset(C, key, transform, file_length, stream)
    if key == "train_source":
        labelled = set(base.names)
    else:
        labelled = set(_list_dataset(C, "train_source", transform, None, stream).names)
    num_classes = int(_cfg(C, "num_classes"))
    path = image_labels_source(C, base.root)
    table = read_image_label_list(path, num_classes) if path is not None else None
    return LPLDataset(base, transform, labelled, num_classes, table, path or "",
                      file_length, seed=int(_cfg(C, "seed", 0)), stream=stream)


def lpl_strong_dataset(C, source: str = "train", stream: int = 0,
                       file_length: Optional[int] = None) -> LPLDataset:
    """The strong stream's dataset (a :class:`~furnace.data.loader.StreamSpec` ``dataset``
    hook): the list of ``source`` (LPL: 'train', the labelled list) with the strong pipeline
    (K = 2), length ``file_length`` (index i reads entry i mod N)."""
    return lpl_dataset(C, source, _strong(C), stream, file_length)


def lpl_weak_dataset(C, source: str = "unlabeled", stream: int = 1,
                     file_length: Optional[int] = None) -> LPLDataset:
    """The weak stream's dataset (a StreamSpec ``dataset`` hook): the list of ``source``
    (LPL: 'unlabeled', the full ordered list D) with the weak pipeline (normalise + crop)."""
    return lpl_dataset(C, source, weak_transform_from_config(C), stream, file_length)


def lpl_retrain_dataset(C, source: str = "train", stream: int = 0,
                        file_length: Optional[int] = None) -> SegmentationDataset:
    """Stage 2's dataset (a StreamSpec ``dataset`` hook): the framework's training dataset of
    ``source`` (the exported list: GT for the pixel-labelled ids, pseudo-label PNGs for the
    rest) with the strong pipeline; items as every training dataset's (data, label, ...)."""
    key = "train_source" if canonical_mode(source) == "train" else "unsup_source"
    return _list_dataset(C, key, _strong(C), file_length, stream)
