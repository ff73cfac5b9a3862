"""Training loaders (REFERENCE 4.3, 4.5): the streams a method declares (:class:`StreamSpec`;
DUEB's are labelled, unlabelled-0 with CutMix masks and unlabelled-1), each over a dataset of
length max_samples, with `niters_per_epoch` batches per epoch, drop_last, and per-process
batch = batch_size // world_size.

Unlike the reference (shuffle=True, a fresh randperm per item) each loader uses a
`DistributedSampler` (also for one process) with its own seed and `set_epoch(epoch)`, so the
order is reproducible and U0/U1 shuffle independently. The samplers hand out
(index, epoch) pairs, from which the datasets derive the augmentation RNG, so the batches for a
given seed are the same for any num_workers.
"""
from __future__ import annotations

import atexit
import random
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .cutmix import MaskCollate, mask_generator_from_config, seg_collate
from .datasets import DataError, _cfg, build_train_dataset, warn_overlap

# Seed offsets between the three samplers; large so that (seed + offset + epoch) of one loader
# does not reproduce another loader's order one epoch later (DistributedSampler seeds with
# seed + epoch).
_SEED_STRIDE = 1_000_003
# Virtual-epoch stride for extra passes inside one epoch (only when niters_per_epoch needs more
# batches than one pass over the dataset gives).
_PASS_STRIDE = 100_000_007


class EpochTaggedSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) pairs instead of indices.

    The datasets use the epoch tag to seed each sample's augmentation, which makes batches
    independent of the number and scheduling of loader workers.
    """

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        for i in super().__iter__():
            yield (int(i), epoch)


@dataclass(frozen=True)
class StreamSpec:
    """One training stream: a loader a method draws one batch from every iteration.

    ``name``: the stream's name (the method's key for it). ``source``: the list it reads,
    ``train`` (``train_source``, labelled) or ``unlabeled`` (``unsup_source``). ``index``: its
    seeds (sampler order, per-sample augmentation); streams of one run need distinct indices,
    and two streams over one list with different indices see independent orders and crops.
    ``collate``: ``collate(C)`` returns the loader's collate function (None: :func:`seg_collate`);
    a collate sees each sample's private seed, so it can add further views of the same crop
    (a colour-jittered strong view, CutMix masks) that do not depend on the workers.
    ``dataset``: ``dataset(C, source, index, file_length)`` returns the stream's dataset
    (None: :func:`build_train_dataset` of ``source``); it must accept the sampler's
    (index, epoch) pairs and have length ``file_length``, like the framework's datasets.
    ``shuffle``: ``shuffle(C)`` says whether the sampler draws a new order every epoch (None:
    yes); False keeps the list's order every epoch (a reference loader with shuffle=False).
    """
    name: str
    source: str = "train"
    index: int = 0
    collate: Optional[Callable[[Any], Callable]] = None
    dataset: Optional[Callable[..., Any]] = None
    shuffle: Optional[Callable[[Any], bool]] = None

    def shuffles(self, C) -> bool:
        return True if self.shuffle is None else bool(self.shuffle(C))

    def collate_fn(self, C) -> Callable:
        return seg_collate if self.collate is None else self.collate(C)

    def build_dataset(self, C, file_length: int):
        """The stream's training dataset of length ``file_length``."""
        if self.dataset is None:
            return build_train_dataset(C, self.source, stream=self.index,
                                       file_length=file_length)
        return self.dataset(C, self.source, self.index, file_length)


def cutmix_collate(C) -> MaskCollate:
    """The collate of DUEB's unlabelled stream 0: a CutMix box mask per image (``mask``)."""
    return MaskCollate(mask_generator_from_config(C))


#: DUEB's streams (REFERENCE 4.5): labelled; unlabelled with CutMix masks; a second,
#: independently shuffled and augmented unlabelled stream
DUEB_STREAMS = (StreamSpec("labeled", "train", 0),
                StreamSpec("unlabeled0", "unlabeled", 1, cutmix_collate),
                StreamSpec("unlabeled1", "unlabeled", 2))


def worker_init_fn(worker_id: int) -> None:
    """Loader worker setup: no OpenCV threads (workers already run in parallel) and Python /
    NumPy RNGs seeded from the worker's torch seed (which derives from the loader generator)."""
    cv2.setNumThreads(0)
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, batch_size: int, sampler, collate_fn, num_workers: int = 0,
                seed: int = 0, pin_memory: Optional[bool] = None) -> DataLoader:
    """DataLoader with drop_last, seeded workers (worker_init_fn + generator), pin_memory when
    CUDA is available (unless given) and persistent workers when num_workers > 0."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    g = torch.Generator()
    g.manual_seed(int(seed) & 0xFFFFFFFFFFFF)
    kwargs: Dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
                      drop_last=True, worker_init_fn=worker_init_fn, generator=g, **kwargs)


def per_process_batch(batch_size: int, world_size: int) -> int:
    """batch_size // world_size, with DataError for a batch below 2 per process (BatchNorm of
    the ASPP pooled branch sees one value per channel and cannot train, QUIRK 42) unless
    several processes share SyncBatchNorm statistics (global batch >= 2)."""
    batch_size, world_size = int(batch_size), int(world_size)
    b = batch_size // max(1, world_size)
    # under DDP SyncBatchNorm normalises over every process's images: 1 each is enough there
    if b < 2 and not (world_size > 1 and b * world_size >= 2):
        raise DataError(f"batch_size={batch_size} over world_size={world_size} gives {b} "
                        f"sample(s) per process; training needs at least 2 per process "
                        f"(BatchNorm in the ASPP image-pooling branch cannot train on 1). "
                        f"Set batch_size >= {2 * max(1, world_size)}")
    if batch_size % max(1, world_size):
        warnings.warn(f"batch_size={batch_size} is not divisible by world_size={world_size}; "
                      f"each process uses {b} (global batch {b * world_size})")
    return b


def shutdown_workers(loader: DataLoader) -> None:
    """Stop the persistent workers of ``loader`` now (they otherwise live as long as it)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


# Loaders still alive at interpreter exit (after an error the traceback's frames can hold
# them) are shut down before multiprocessing joins their workers: workers forked while the
# trainer's stop-signal handlers were installed ignore the SIGTERM it would send, and the exit
# waited for them forever (or printed a worker-killed traceback after the error line).
_LIVE: "weakref.WeakSet[TrainLoaders]" = weakref.WeakSet()
_AT_EXIT = []


def _close_live_loaders() -> None:
    for loaders in list(_LIVE):
        loaders.close()


class TrainLoaders:
    """The training loaders of one process, one per stream.

    Args:
        C: config with dataset, dataset_path, train_source, unsup_source, num_classes,
           image_height/width, train_scale_array, image_mean/std, batch_size (global),
           num_workers, seed, max_samples, niters_per_epoch and the cutmix_* keys.
        rank, world_size: this process and the number of processes.
        num_workers, pin_memory: override the config / the CUDA-based default.
        streams: the :class:`StreamSpec` s to build, in order (default DUEB's three).
    Use:
        loaders = TrainLoaders(C, rank=0, world_size=1)
        for lab, u0, u1 in loaders.epoch(epoch):  # exactly niters_per_epoch tuples
            lab['data'] [b,3,h,w] float32, lab['label'] [b,h,w] int64,
            u0['data'] [b,3,h,w], u0['mask'] [b,1,h,w] float32 in {0,1}, u1['data'] [b,3,h,w]
    """

    def __init__(self, C, rank: int = 0, world_size: int = 1,
                 num_workers: Optional[int] = None, pin_memory: Optional[bool] = None,
                 streams: Sequence[StreamSpec] = DUEB_STREAMS):
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.seed = int(_cfg(C, "seed", 0))
        self.batch_size = per_process_batch(_cfg(C, "batch_size", 2), self.world_size)
        nw = int(_cfg(C, "num_workers", 0)) if num_workers is None else int(num_workers)

        # datasets: streams 0/1/2 give U0 and U1 independent augmentations of the same list
        probe = build_train_dataset(C, "train", stream=0, file_length=1)
        uprobe = build_train_dataset(C, "unlabeled", stream=1, file_length=1)
        self.n_labeled, self.n_unlabeled = probe.n, uprobe.n
        streams = list(streams)
        if all(s.dataset is None for s in streams):
            # a stream with its own dataset decides how it uses the lists (one may be meant
            # to hold the other, as a full training list holds the labelled one)
            warn_overlap(probe, uprobe)
        if int(_cfg(C, "batch_size", 2)) > self.n_labeled:
            raise DataError(f"batch_size={_cfg(C, 'batch_size')} is larger than the labelled set "
                            f"({self.n_labeled} entries in {probe.list_file}); lower batch_size "
                            f"or use a larger labelled split")
        max_samples = _cfg(C, "max_samples")
        self.max_samples = int(max_samples) if max_samples is not None else max(
            self.n_labeled, self.n_unlabeled)
        self.streams = streams
        indices = [s.index for s in self.streams]
        if not self.streams or len(set(indices)) != len(indices):
            raise ValueError(f"streams need distinct indices, got {indices}")
        for s in self.streams:
            if s.source not in ("train", "unlabeled"):
                raise ValueError(f"stream {s.name!r}: source must be 'train' or 'unlabeled', "
                                 f"got {s.source!r}")
        self.datasets = [s.build_dataset(C, self.max_samples) for s in self.streams]
        self.samplers = [
            EpochTaggedSampler(ds, num_replicas=self.world_size, rank=self.rank,
                               shuffle=s.shuffles(C),
                               seed=self.seed + s.index * _SEED_STRIDE, drop_last=True)
            for s, ds in zip(self.streams, self.datasets)]
        self.batches_per_pass = len(self.samplers[0]) // self.batch_size
        if self.batches_per_pass < 1:
            raise DataError(f"max_samples={self.max_samples} over world_size={self.world_size} "
                            f"is smaller than the per-process batch {self.batch_size}; raise "
                            f"max_samples")
        niters = _cfg(C, "niters_per_epoch")
        self.niters_per_epoch = (int(niters) if niters is not None
                                 else self.max_samples // int(_cfg(C, "batch_size", 2)))
        if self.niters_per_epoch < 1:
            raise DataError(f"niters_per_epoch={self.niters_per_epoch} must be >= 1")

        self.loaders = [
            make_loader(ds, self.batch_size, sampler, s.collate_fn(C), nw,
                        self.seed + s.index * _SEED_STRIDE, pin_memory)
            for s, ds, sampler in zip(self.streams, self.datasets, self.samplers)]
        if nw > 0:
            if not _AT_EXIT:  # registered after multiprocessing's hook, so it runs before it
                atexit.register(_close_live_loaders)
                _AT_EXIT.append(True)
            _LIVE.add(self)

    def close(self) -> None:
        """Shut the loader workers down (a no-op without workers); the loaders stay usable
        and start new workers when iterated again."""
        for loader in getattr(self, "loaders", ()):
            shutdown_workers(loader)

    def __len__(self) -> int:
        return self.niters_per_epoch

    def _stream(self, k: int, epoch: int) -> Iterator[Dict[str, Any]]:
        """Endless batches of loader k for `epoch`; starts another pass (a new virtual epoch) if
        niters_per_epoch asks for more batches than one pass holds."""
        p = 0
        while True:
            self.samplers[k].set_epoch(epoch + p * _PASS_STRIDE)
            for batch in self.loaders[k]:
                yield batch
            p += 1

    def epoch(self, epoch: int) -> Iterator[Tuple[Dict[str, Any], ...]]:
        """Yield exactly niters_per_epoch tuples of batches, one per stream."""
        streams = [self._stream(k, int(epoch)) for k in range(len(self.loaders))]
        try:
            for _ in range(self.niters_per_epoch):
                yield tuple(next(s) for s in streams)
        finally:
            for s in streams:
                s.close()

    def __repr__(self) -> str:
        g = self.__dict__.get  # also safe on a half-built object (an error in __init__)
        return (f"TrainLoaders(labeled={g('n_labeled')}, unlabeled={g('n_unlabeled')}, "
                f"max_samples={g('max_samples')}, batch/process={g('batch_size')}, "
                f"niters_per_epoch={g('niters_per_epoch')}, rank={g('rank')}/{g('world_size')})")
