"""Datasets for the CPS archive layouts of PASCAL VOC and Cityscapes (REFERENCE 4.1-4.3).

Three modes:
- 'train' (labelled): {'data': float32 tensor [3,h,w], 'label': int64 tensor [h,w], 'fn', 'n'}
- 'unlabeled':        {'data': float32 tensor [3,h,w], 'fn', 'n'}            (no 'label')
- 'eval':             {'data': uint8 numpy [H,W,3] RGB, 'label': uint8 numpy [H,W], 'fn', 'n'}
'fn' is the sample name, 'n' the number of entries in the list file.

Training datasets have length `file_length` (the config's max_samples) and map index i to
list entry i % n, a fixed repeat; the per-epoch shuffle is the sampler's job (this replaces
the reference's fresh randperm per item, QUIRK 25). An index may be an int or an
(index, epoch) tuple; with the tuple the augmentation RNG is derived from
(seed, stream, epoch, index), so a sample does not depend on the worker that loads it.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .cutmix import SEED_KEY
from .transforms import IGNORE_INDEX, TrainTransform

MODES = ("train", "unlabeled", "eval")
_MODE_ALIASES = {"train": "train", "labeled": "train", "labelled": "train", "sup": "train",
                 "unlabeled": "unlabeled", "unlabelled": "unlabeled", "unsup": "unlabeled",
                 "eval": "eval", "val": "eval", "test": "eval"}
_LAYOUT_ALIASES = {"voc": "voc", "pascal_voc": "voc", "pascal": "voc", "demo": "voc",
                   "city": "city", "cityscapes": "city"}


logger = logging.getLogger("furnace.data")

# The text PyTorch gives an error re-raised from a DataLoader worker: "Caught <Type> in
# DataLoader worker process N.\nOriginal Traceback (most recent call last): ...".
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class DataError(ValueError):
    """Bad dataset input: missing/unreadable file, bad label values, size mismatch, empty list,
    unusable batch settings. The message names the offending path or value and the fix.

    Raised inside a DataLoader worker, PyTorch re-creates it in the main process with the
    worker's whole traceback as the message; the constructor keeps only the original message
    (one line for the user) and the worker note in ``worker_traceback``.
    """

    def __init__(self, *args):
        self.worker_traceback = None
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_WRAPPED.match(args[0]):
            self.worker_traceback = args[0]
            args = (_original_message(args[0], type(self).__name__),)
        super().__init__(*args)


def _original_message(wrapped: str, type_name: str) -> str:
    """The message of the last ``[module.]<type_name>: message`` line of a formatted traceback."""
    matches = list(re.finditer(rf"(?m)^(?:[\w.]+\.)?{re.escape(type_name)}: ", wrapped))
    if not matches:
        return wrapped.splitlines()[0]
    return wrapped[matches[-1].end():].strip()


def _path_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be opened when it is not simply missing (symlink loop, broken link,
    permission, a folder where a file is expected), or None."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is in a symlink loop (a link points back to itself or its folder); fix the link"
        if os.path.islink(path):
            return f"is a broken symlink (to {os.readlink(path)}); fix the link"
        if e.errno == errno.EACCES:
            return "cannot be accessed (permission denied); make it readable"
        return None
    if os.path.isdir(path) and not os.path.isfile(path):
        return "is a folder, not a file"
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied); make it readable"
    return None


# ----------------------------------------------------------------------------------- helpers

def canonical_layout(dataset: str) -> str:
    """'voc' or 'city' for a dataset name (aliases: pascal_voc, demo, cityscapes)."""
    key = str(dataset).lower()
    if key not in _LAYOUT_ALIASES:
        raise DataError(f"unknown dataset {dataset!r}: set dataset to 'voc' (VOC layout, also the "
                        f"demo data) or 'city' (Cityscapes layout)")
    return _LAYOUT_ALIASES[key]


def canonical_mode(mode: str) -> str:
    key = str(mode).lower()
    if key not in _MODE_ALIASES:
        raise ValueError(f"unknown dataset mode {mode!r}; use one of {MODES}")
    return _MODE_ALIASES[key]


def read_text_lines(path: str, kind: str, missing_hint: str) -> List[str]:
    """The lines of a text file (CRLF and a UTF-8 BOM tolerated); DataError naming ``kind``
    and ``path`` when it is not a readable file (``missing_hint``: what to check)."""
    problem = _path_problem(path)
    if problem:
        raise DataError(f"{kind} {path} {problem}")
    if not os.path.isfile(path):
        raise DataError(f"{kind} not found: {path} ({missing_hint})")
    try:
        with open(path, "r", encoding="utf-8-sig", newline=None) as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {kind} {path}: {e}") from e


def read_list_file(path: str) -> List[Tuple[int, str]]:
    """Non-blank lines of a list file as (1-based line number, line without CR/LF).

    Tolerates CRLF line endings and a UTF-8 BOM. Raises DataError if the file is missing or
    holds no entries.
    """
    raw = read_text_lines(path, "list file", "check dataset_path and the *_source keys; "
                          "relative list paths are taken relative to dataset_path")
    lines = [(i + 1, ln.rstrip("\r\n")) for i, ln in enumerate(raw) if ln.strip()]
    if not lines:
        raise DataError(f"list file {path} is empty: it must list one sample per line "
                        f"(generate splits with `python -m furnace.data.splits`)")
    return lines


def resolve_source(dataset_path: str, source: str, key: str = "source") -> str:
    """Absolute path of a list file given relative to `dataset_path` (or absolute)."""
    if source is None or str(source) == "":
        raise DataError(f"config key {key} is not set: give a list file path (relative to "
                        f"dataset_path or absolute)")
    source = os.path.expanduser(str(source))
    if os.path.isabs(source):
        return source
    return os.path.join(str(dataset_path), source)


def check_root(root: str, layout: str) -> str:
    """Raise DataError unless the dataset root folder exists; returns it."""
    if root is None or str(root) == "":
        raise DataError("dataset_path is not set: point it at the dataset folder (see "
                        "DATA/README.md), e.g. --set dataset_path=/data/pascal_voc")
    root = os.path.expanduser(str(root))
    problem = _path_problem(root)
    if problem and problem != "is a folder, not a file":
        raise DataError(f"dataset folder {root} {problem}")
    if os.path.isfile(root):
        raise DataError(f"dataset_path {root} is a file, not a folder; set dataset_path to the "
                        f"dataset folder (see DATA/README.md)")
    if not os.path.isdir(root):
        hint = ("train_aug/{image,label}/, val/{image,label}/, val.txt, subset_train_aug/"
                if layout == "voc" else "images/, segmentation/, config_new/")
        raise DataError(f"dataset folder not found: {root} (set dataset_path to the folder that "
                        f"holds {hint}; see DATA/README.md)")
    return root


def _first_existing(candidates: Sequence[str]) -> Optional[str]:
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


def _inside(root: str, path: str) -> bool:
    """Whether ``path`` lies in the folder ``root`` (lexically, after normalising '..')."""
    root = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.abspath(path))
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_inside(root: str, path: str, entry: str, where: str, allow_outside: bool) -> None:
    """DataError unless ``path`` (built from list ``entry``) lies under the dataset ``root``:
    a list must not make training read arbitrary files (``allow_outside_root`` lifts this)."""
    if not allow_outside and not _inside(root, path):
        raise DataError(f"list entry {where} {entry!r} points outside the dataset folder {root} "
                        f"(to {os.path.normpath(path)}); fix the list, or set "
                        f"allow_outside_root=true if that is intended")


def _join_entry(root: str, entry: str, where: str = "",
                allow_outside: bool = False) -> List[str]:
    """Candidate paths for a list entry: root-joined (a leading '/' means 'under the root', as in
    the CPS lists), then the entry itself when it is an existing absolute path. Paths outside
    the root raise DataError unless ``allow_outside``."""
    rel = entry.lstrip("/\\")
    cands = [os.path.normpath(os.path.join(root, rel))]
    check_inside(root, cands[0], entry, where, allow_outside)
    if os.path.isabs(entry) and (allow_outside or _inside(root, entry)):
        cands.append(entry)
    return cands


def _jpeg_complete(data: bytes) -> bool:
    """Whether JPEG bytes reach their end-of-image marker. OpenCV decodes a truncated JPEG
    with the missing part grey (and only a libjpeg warning), so the structure is walked here:
    marker segments are skipped by their length (an EXIF thumbnail's own end marker does not
    count), entropy-coded data up to the next marker that is not a stuffed 0xFF00 or RSTn."""
    n, i = len(data), 2
    while i < n:
        if data[i] != 0xFF:  # stray bytes between segments: libjpeg skips to the next marker
            i = data.find(b"\xff", i)
            if i < 0:
                return False
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return False
        marker = data[i]
        i += 1
        if marker == 0xD9:
            return True
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            continue
        if i + 2 > n:
            return False
        i += int.from_bytes(data[i:i + 2], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data follows the header
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return False
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    i = j + 2
                elif nxt == 0xFF:
                    i = j + 1
                else:
                    i = j
                    break
    return False


def read_image(path: str, where: str = "") -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3] (grey images are expanded to 3 channels)."""
    src = f" (listed in {where})" if where else ""
    problem = _path_problem(path)
    if problem:
        raise DataError(f"image file {path}{src} {problem}")
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}{src}; check dataset_path and the list file")
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"\xff\xd8" and not _jpeg_complete(head + f.read()):
            raise DataError(f"image {path}{src} is a truncated JPEG (it ends before its "
                            f"end-of-image marker, so part of it would train as grey); "
                            f"restore the file or remove its list line")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"cannot read image {path}{src}: not a readable image (corrupt or "
                        f"unsupported format); re-export it as JPEG or PNG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str, where: str = "") -> np.ndarray:
    """Read a label map as class indices, uint8 [H, W].

    Palette ('P') PNGs give their palette indices and grey ('L', '1', 16-bit 'I') PNGs their
    values. Colour (RGB/RGBA) labels are rejected: convert them to index PNGs first.
    """
    src = f" (listed in {where})" if where else ""
    problem = _path_problem(path)
    if problem:
        raise DataError(f"label file {path}{src} {problem}")
    if not os.path.isfile(path):
        raise DataError(f"label file not found: {path}{src}; check dataset_path and the list file")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.array(im)
            else:
                raise DataError(f"label {path}{src} is a {mode!r} image; labels must be "
                                f"single-channel index maps (palette 'P' or grey 'L' PNG with "
                                f"class ids 0..C-1 and 255 = ignore). Convert colour labels to "
                                f"class indices first")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read label {path}{src}: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"label {path}{src} has shape {arr.shape}; expected a 2-D index map")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = np.unique(arr[(arr < 0) | (arr > 255)])[:10].tolist()
            raise DataError(f"label {path}{src} has values {bad} outside 0..255; labels must hold "
                            f"class ids 0..C-1 and 255 = ignore")
        arr = arr.astype(np.uint8)
    return arr


def check_label_values(label: np.ndarray, num_classes: Optional[int], path: str,
                       where: str = "") -> None:
    """Raise DataError if `label` holds values outside [0, num_classes) U {255}."""
    if num_classes is None or label.size == 0:
        return
    m = int(label.max())
    if m < num_classes:
        return  # fast path: one pass for the common case
    bad_mask = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad_mask.any():
        bad = np.unique(label[bad_mask])[:10].tolist()
        src = f" (listed in {where})" if where else ""
        raise DataError(f"label {path}{src} has values {bad} outside [0, {num_classes}) and 255; "
                        f"check num_classes={num_classes} and that the label PNG stores class "
                        f"indices (255 = ignore)")


# ----------------------------------------------------------------------------------- warnings

_WARNED = set()  # (kind, list files): each warning is shown once per process


def warn_once(key: Tuple, message: str) -> bool:
    """Log ``message`` as a warning the first time ``key`` is seen; returns whether it did."""
    if key in _WARNED:
        return False
    _WARNED.add(key)
    logger.warning(message)
    return True


def _entry_key(e: "_Entry") -> str:
    return os.path.normpath(e.img[0])


def warn_duplicates(entries: Sequence["_Entry"], list_file: str) -> List[str]:
    """Warn once per list file when it names the same image twice (an epoch then sees it
    twice, and an eval list counts it twice in the mIoU). Returns the repeated image paths."""
    seen, dups = {}, []
    for e in entries:
        k = _entry_key(e)
        if k in seen:
            dups.append((e.where, seen[k]))
        else:
            seen[k] = e.where
    if dups:
        warn_once(("duplicates", os.path.abspath(list_file)),
                  f"{list_file} lists {len(dups)} image(s) more than once (e.g. "
                  f"{dups[0][0]} repeats {dups[0][1]}); remove the repeated lines")
    return [d[0] for d in dups]


def warn_overlap(labeled: "SegmentationDataset", unlabeled: "SegmentationDataset") -> int:
    """Warn once when images of the labelled list also appear in the unlabelled list (the
    splits are meant to be disjoint). Returns the number of shared images."""
    lab = {_entry_key(e): e.where for e in labeled.entries}
    shared = [(e.where, lab[_entry_key(e)]) for e in unlabeled.entries if _entry_key(e) in lab]
    if shared:
        warn_once(("overlap", os.path.abspath(labeled.list_file),
                   os.path.abspath(unlabeled.list_file)),
                  f"{len(shared)} image(s) of the labelled list are also in the "
                  f"unlabelled list (e.g. {shared[0][0]} is {shared[0][1]}); the splits should "
                  f"not overlap (regenerate them with `python -m furnace.data.splits`)")
    return len(shared)


# ----------------------------------------------------------------------------------- datasets

class _Entry:
    __slots__ = ("fn", "img", "label", "where")

    def __init__(self, fn: str, img: List[str], label: Optional[List[str]], where: str):
        self.fn = fn          # sample name
        self.img = img        # candidate image paths, first existing wins
        self.label = label    # candidate label paths or None
        self.where = where    # "list:line" for error messages


def split_key(key: Union[int, Tuple[int, int]]) -> Tuple[int, Optional[int]]:
    """A training dataset's item key: a plain index, or the sampler's (index, epoch) pair,
    as (index, epoch or None)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


class SegmentationDataset(Dataset):
    """Base class: a parsed list of (image, label) entries plus the mode logic.

    Args:
        entries: parsed list entries (built by the subclasses).
        list_file: the list file path (for messages).
        mode: 'train' | 'unlabeled' | 'eval'.
        num_classes: labels must hold values in [0, num_classes) U {255}; None skips the check.
        transform: TrainTransform, required in the training modes.
        file_length: training dataset length (the config's max_samples); None = list length.
        seed, stream: seed of the per-sample augmentation RNG for epoch-tagged indices; use a
            different stream for datasets that share a list (U0 and U1).
    """

    layout = "generic"

    def __init__(self, entries: List[_Entry], list_file: str, mode: str = "train",
                 num_classes: Optional[int] = None, transform: Optional[TrainTransform] = None,
                 file_length: Optional[int] = None, seed: int = 0, stream: int = 0):
        self.mode = canonical_mode(mode)
        self.list_file = list_file
        self.entries = entries
        self.num_classes = None if num_classes is None else int(num_classes)
        if self.mode != "eval" and transform is None:
            raise ValueError(f"{type(self).__name__}: mode {self.mode!r} needs a TrainTransform")
        self.transform = transform
        if file_length is not None and int(file_length) < 1:
            raise DataError(f"dataset length (max_samples) must be >= 1, got {file_length}")
        self.file_length = None if file_length is None else int(file_length)
        if self.mode == "eval":
            self.file_length = None  # eval datasets use the plain list
        self.seed = int(seed)
        self.stream = int(stream)
        warn_duplicates(entries, list_file)
        if self.mode != "unlabeled":
            for e in entries:
                if e.label is None and not getattr(self, "_labels_optional", False):
                    raise DataError(f"list entry {e.where} has no label path, but mode "
                                    f"{self.mode!r} needs labels (use an unlabelled list only "
                                    f"for unsup_source)")

    # -- size and names
    @property
    def n(self) -> int:
        """Number of entries in the list file."""
        return len(self.entries)

    @property
    def names(self) -> List[str]:
        return [e.fn for e in self.entries]

    def __len__(self) -> int:
        return self.file_length if self.file_length is not None else len(self.entries)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(list={self.list_file!r}, mode={self.mode!r}, "
                f"n={self.n}, len={len(self)})")

    # -- reading
    def paths(self, i: int) -> Tuple[str, Optional[str]]:
        """(image path, label path or None) of list entry i; the first existing candidate, or
        the first candidate when none exists."""
        e = self.entries[i]
        img = _first_existing(e.img) or e.img[0]
        lab = None
        if e.label is not None:
            lab = _first_existing(e.label) or e.label[0]
        return img, lab

    def load(self, i: int, with_label: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Read list entry i: image uint8 [H,W,3] RGB, label uint8 [H,W] (or None), checked."""
        e = self.entries[i]
        img_path, lab_path = self.paths(i)
        img = read_image(img_path, e.where)
        label = None
        if with_label and lab_path is not None:
            label = read_label(lab_path, e.where)
            if label.shape != img.shape[:2]:
                raise DataError(f"size mismatch in {e.where}: image {img_path} is "
                                f"{img.shape[1]}x{img.shape[0]} (WxH) but label {lab_path} is "
                                f"{label.shape[1]}x{label.shape[0]}; image and label must have "
                                f"the same size")
            check_label_values(label, self.num_classes, lab_path, e.where)
        return img, label

    def _file_index(self, idx: int) -> int:
        length = len(self)
        if idx < 0:
            idx += length
        if not 0 <= idx < length:
            raise IndexError(f"index {idx} out of range for dataset of length {length}")
        return idx % len(self.entries)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        idx, epoch = split_key(key)
        i = self._file_index(idx)
        e = self.entries[i]
        if self.mode == "eval":
            img, label = self.load(i, with_label=True)
            out = {"data": img, "fn": e.fn, "n": self.n}
            if label is not None:
                out["label"] = label
            return out
        img, label = self.load(i, with_label=self.mode == "train")
        if epoch is not None:
            seed = (self.seed & 0xFFFFFFFF, self.stream, epoch & 0xFFFFFFFF, idx)
            rng = np.random.default_rng(seed)
        else:
            seed = None
            # plain int index: draw from the global NumPy RNG (seeded per worker by PyTorch)
            rng = np.random.default_rng(np.random.randint(0, 2 ** 32, size=4, dtype=np.uint64))
        data, label = self.transform(img, label, rng)
        out = {"data": torch.from_numpy(data), "fn": e.fn, "n": self.n}
        if label is not None:
            out["label"] = torch.from_numpy(label)
        if seed is not None:
            out[SEED_KEY] = seed
        return out


def voc_folder_for_list(list_file: str) -> str:
    """VOC sub-folder chosen from the list-file basename (REFERENCE 4.2): contains 'train' ->
    'train_aug', contains 'test_id' -> 'test', else the basename without extension."""
    base = os.path.splitext(os.path.basename(list_file))[0]
    if "train" in base:
        return "train_aug"
    if "test_id" in base:
        return "test"
    return base


class VOCDataset(SegmentationDataset):
    """PASCAL VOC (CPS 'pascal_voc' archive) and the demo data.

    Layout under `root`: <folder>/image/<id>.jpg (or .png), <folder>/label/<id>.png, where the
    folder comes from the list basename (see `voc_folder_for_list`, override with `folder`);
    for the 'test' folder images are <root>/test/<id>.jpg and there are no labels.
    A list line is an id; a line containing './' has the label path in its second tab column
    (pseudo-label lists; absolute, or relative to root, the list's folder or the cwd).
    """

    layout = "voc"

    def __init__(self, root: str, list_file: str, mode: str = "train",
                 num_classes: Optional[int] = 21, transform: Optional[TrainTransform] = None,
                 file_length: Optional[int] = None, seed: int = 0, stream: int = 0,
                 folder: Optional[str] = None, allow_outside_root: bool = False):
        root = check_root(root, "voc")
        lines = read_list_file(list_file)
        chosen = folder is None
        folder = folder or voc_folder_for_list(list_file)
        is_test = folder == "test"
        fdir = os.path.join(root, folder)
        if not os.path.isdir(fdir):
            why = (f"chosen from the list name {os.path.basename(list_file)}: names containing "
                   f"'train' read train_aug/, 'test_id' reads test/, others the folder of the "
                   f"same name; for lists named otherwise, such as U2PL's labeled.txt, set "
                   f"voc_train_folder=train_aug" if chosen else
                   f"set by voc_train_folder for {os.path.basename(list_file)}; name a "
                   f"folder under dataset_path that holds image/ and label/")
            raise DataError(f"VOC folder not found: {fdir} ({why})")
        self._labels_optional = is_test
        list_dir = os.path.dirname(os.path.abspath(list_file))
        entries = []
        for ln, line in lines:
            cols = line.strip().split("\t")
            name = cols[0].strip()
            where = f"{list_file}:{ln}"
            if is_test:
                imgs = [os.path.join(fdir, name + ".jpg"), os.path.join(fdir, name + ".png")]
                label = None
            else:
                imgs = [os.path.join(fdir, "image", name + ".jpg"),
                        os.path.join(fdir, "image", name + ".png")]
                label = [os.path.join(fdir, "label", name + ".png")]
            # an id such as ../../x would read outside the dataset folder
            check_inside(root, imgs[0], name, where, allow_outside_root)
            if "./" in line:
                if len(cols) < 2 or not cols[1].strip():
                    raise DataError(f"list entry {where} contains './' (pseudo-label list) but "
                                    f"has no second tab-separated column with the label path")
                lp = cols[1].strip()
                label = [lp] if os.path.isabs(lp) else [
                    os.path.normpath(os.path.join(root, lp)),
                    os.path.normpath(os.path.join(list_dir, lp)), os.path.abspath(lp)]
            entries.append(_Entry(name, imgs, label, where))
        super().__init__(entries, list_file, mode, num_classes, transform, file_length, seed,
                         stream)
        self.root = root
        self.folder = folder


# U2PL's Cityscapes list line: leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
_U2PL_CITY = re.compile(r"^/?leftImg8bit/(?P<split>[^/\s]+)/[^/\s]+/(?P<name>[^/\s]+)"
                        r"_leftImg8bit\.png$")


def u2pl_city_entry(line: str, where: str = "") -> Optional[Tuple[str, str]]:
    """The CPS-layout (image, label) pair of a U2PL Cityscapes list line, or None when the
    line is not in U2PL form (it does not start with leftImg8bit/).

    ``leftImg8bit/train/aachen/aachen_000140_000019_leftImg8bit.png`` ->
    (``/images/train/aachen_000140_000019.png``,
    ``/segmentation/train/aachen_000140_000019_gtFine.png``). A line that starts with
    leftImg8bit but is not of that form raises DataError naming ``where`` (file:line).
    """
    text = line.strip()
    if not text.lstrip("/").startswith("leftImg8bit/"):
        return None
    m = _U2PL_CITY.match(text)
    if m is None:
        raise DataError(f"list entry {where} {text!r} starts like a U2PL Cityscapes line but "
                        f"is not 'leftImg8bit/<split>/<city>/<name>_leftImg8bit.png'; "
                        f"fix the line, or use the CPS form '/images/<split>/<name>.png<TAB>"
                        f"/segmentation/<split>/<name>_gtFine.png'")
    split, name = m.group("split"), m.group("name")
    return f"/images/{split}/{name}.png", f"/segmentation/{split}/{name}_gtFine.png"


class CityscapesDataset(SegmentationDataset):
    """Cityscapes (CPS 'city' archive): list lines are
    ``/images/train/x.png<TAB>/segmentation/train/x_gtFine.png`` relative to `root`.
    The label column is optional for unlabelled lists. fn = label file name without extension
    (image name when there is no label column). Labels are trainId maps (0-18, 255).
    U2PL-form lines (``leftImg8bit/train/<city>/x_leftImg8bit.png``, one column) are mapped to
    the CPS paths above (see :func:`u2pl_city_entry`), so U2PL's split lists load as they are."""

    layout = "city"

    def __init__(self, root: str, list_file: str, mode: str = "train",
                 num_classes: Optional[int] = 19, transform: Optional[TrainTransform] = None,
                 file_length: Optional[int] = None, seed: int = 0, stream: int = 0,
                 allow_outside_root: bool = False):
        root = check_root(root, "city")
        lines = read_list_file(list_file)
        entries = []
        for ln, line in lines:
            cols = [c.strip() for c in line.split("\t") if c.strip()]
            if len(cols) == 1 and len(line.split()) == 2:
                cols = line.split()  # tolerate space-separated lists
            where = f"{list_file}:{ln}"
            if len(cols) > 2:
                raise DataError(f"list entry {where} has {len(cols)} columns; expected "
                                f"'<image path><TAB><label path>'")
            u2pl = u2pl_city_entry(cols[0], where) if len(cols) == 1 else None
            if u2pl is not None:
                cols = list(u2pl)
            imgs = _join_entry(root, cols[0], where, allow_outside_root)
            label = (_join_entry(root, cols[1], where, allow_outside_root)
                     if len(cols) > 1 else None)
            fn = os.path.splitext(os.path.basename(cols[1] if len(cols) > 1 else cols[0]))[0]
            entries.append(_Entry(fn, imgs, label, where))
        super().__init__(entries, list_file, mode, num_classes, transform, file_length, seed,
                         stream)
        self.root = root


# ----------------------------------------------------------------------------------- builders

def build_dataset(dataset: str, root: str, list_file: str, mode: str,
                  num_classes: Optional[int] = None, transform: Optional[TrainTransform] = None,
                  file_length: Optional[int] = None, seed: int = 0,
                  stream: int = 0, allow_outside_root: bool = False,
                  voc_folder: Optional[str] = None) -> SegmentationDataset:
    """Dataset of layout `dataset` ('voc' | 'city'); arguments as in SegmentationDataset;
    ``allow_outside_root``: accept list entries that point outside `root`; ``voc_folder``:
    the VOC folder under `root` (None: chosen from the list name; ignored for 'city')."""
    layout = canonical_layout(dataset)
    extra = {"folder": voc_folder} if layout == "voc" else {}
    cls = VOCDataset if layout == "voc" else CityscapesDataset
    return cls(root, list_file, mode=mode, num_classes=num_classes, transform=transform,
               file_length=file_length, seed=seed, stream=stream,
               allow_outside_root=allow_outside_root, **extra)


def _cfg(C, key, default=None):
    if hasattr(C, "get"):
        v = C.get(key, default)
    else:
        v = getattr(C, key, default)
    return default if v is None else v


def train_transform_from_config(C) -> TrainTransform:
    """TrainTransform from image_height, image_width, train_scale_array, image_mean, image_std,
    train_scale_mode and train_label_pad."""
    return TrainTransform(
        crop_hw=(int(_cfg(C, "image_height")), int(_cfg(C, "image_width"))),
        scales=list(_cfg(C, "train_scale_array", [0.5, 0.75, 1, 1.5, 1.75, 2.0])),
        mean=list(_cfg(C, "image_mean", [0.485, 0.456, 0.406])),
        std=list(_cfg(C, "image_std", [0.229, 0.224, 0.225])),
        scale_mode=str(_cfg(C, "train_scale_mode", "choice")),
        label_pad=_cfg(C, "train_label_pad", IGNORE_INDEX))


def build_train_dataset(C, mode: str = "train", stream: int = 0,
                        file_length: Optional[int] = None) -> SegmentationDataset:
    """Training dataset from config: mode 'train' reads train_source, 'unlabeled' unsup_source;
    length = file_length, else C.max_samples, else the list length. VOC lists read the folder
    C.voc_train_folder when set (else the one chosen from the list name)."""
    mode = canonical_mode(mode)
    key = "train_source" if mode == "train" else "unsup_source"
    root = check_root(_cfg(C, "dataset_path", ""), canonical_layout(_cfg(C, "dataset", "voc")))
    src = resolve_source(root, _cfg(C, key), key)
    if file_length is None:
        file_length = _cfg(C, "max_samples")
    return build_dataset(_cfg(C, "dataset", "voc"), root, src, mode,
                         num_classes=_cfg(C, "num_classes"),
                         transform=train_transform_from_config(C),
                         file_length=file_length, seed=int(_cfg(C, "seed", 0)), stream=stream,
                         allow_outside_root=bool(_cfg(C, "allow_outside_root", False)),
                         voc_folder=_cfg(C, "voc_train_folder"))


def build_eval_dataset(C, source: Optional[str] = None) -> SegmentationDataset:
    """Eval-mode dataset of C.eval_source (or `source`): items {'data': uint8 [H,W,3] RGB,
    'label': uint8 [H,W], 'fn', 'n'}."""
    root = check_root(_cfg(C, "dataset_path", ""), canonical_layout(_cfg(C, "dataset", "voc")))
    src = resolve_source(root, source if source is not None else _cfg(C, "eval_source"),
                         "eval_source")
    return build_dataset(_cfg(C, "dataset", "voc"), root, src, "eval",
                         num_classes=_cfg(C, "num_classes"),
                         allow_outside_root=bool(_cfg(C, "allow_outside_root", False)))


def count_list_entries(path: str) -> int:
    """Number of non-blank lines of a list file (DataError if missing or empty)."""
    return len(read_list_file(path))
