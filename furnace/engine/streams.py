"""Per-iteration batches of the streams a method asks for, from any position of an epoch.

The training loaders (furnace.data.TrainLoaders) derive every batch from its sampler position
and epoch alone (augmentation and CutMix seeds come from (index, epoch) tags), so a run resumed
at iteration i of an epoch can skip the first i batches at the sampler, without loading their
images, and still see exactly the batches a straight run sees. Streams a method does not use
are never loaded.
"""
from __future__ import annotations

import signal
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from torch.utils.data import DataLoader

from ..data.loader import _PASS_STRIDE

# Preemption signals are the main process's business: it saves a checkpoint and stops the
# workers itself; a worker killed by them first would make the next batch fail instead.
_MAIN_ONLY_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1")
                           if hasattr(signal, n))


class _WorkerInit:
    """The loader's worker_init_fn, after ignoring the preemption signals (picklable)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for s in _MAIN_ONLY_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def _shielded(loader: DataLoader) -> DataLoader:
    if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _WorkerInit):
        loader.worker_init_fn = _WorkerInit(loader.worker_init_fn)
    return loader


def _tail_loader(loader: DataLoader, indices: List[Any]) -> DataLoader:
    """A loader like ``loader`` over an explicit list of sampler items (the rest of a pass)."""
    return _shielded(DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=indices, shuffle=False,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn, generator=loader.generator))


def _stream(loaders, k: int, epoch: int, skip: int) -> Iterator[Dict[str, Any]]:
    """Endless batches of loader ``k`` in ``epoch`` after the first ``skip`` (TrainLoaders'
    order: a further pass over the data is a new virtual epoch)."""
    loader, sampler = loaders.loaders[k], loaders.samplers[k]
    per_pass = len(sampler) // loader.batch_size
    p = skip // per_pass
    skip -= p * per_pass
    while True:
        sampler.set_epoch(epoch + p * _PASS_STRIDE)
        if skip:
            yield from _tail_loader(loader, list(iter(sampler))[skip * loader.batch_size:])
            skip = 0
        else:
            yield from _shielded(loader)
        p += 1


def epoch_batches(loaders, epoch: int, streams: Sequence[int], start: int,
                  stop: int) -> Iterator[Tuple[Dict[str, Any], ...]]:
    """Tuples of batches (one per index in ``streams``, 0 labelled, 1 unlabelled with CutMix
    masks, 2 unlabelled) for iterations ``start .. stop-1`` of ``epoch``."""
    its = [_stream(loaders, k, int(epoch), int(start)) for k in streams]
    try:
        for _ in range(start, stop):
            yield tuple(next(it) for it in its)
    finally:
        for it in its:
            it.close()
