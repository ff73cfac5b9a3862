"""Standard normal fills for the aleatoric loss's Monte Carlo noise.

torch's CPU ``normal_`` runs on one thread, and the T noise draws are the largest share of
the aleatoric loss's time on CPU. Large contiguous CPU fills therefore go through
:func:`normal_`, which cuts the tensor into ``CHUNKS`` fixed chunks, each filled by
``normal_`` with its own ``torch.Generator`` seeded from a 62-bit seed drawn from the caller's
generator, concurrently on up to ``torch.get_num_threads()`` threads: the numbers depend on the
generator state only, never on the thread count. Small, strided and CUDA fills are one plain
``normal_``. (An earlier compiled C generator was removed: it never ran on GPUs, saved about
6 % of a CPU iteration and made the stream depend on the machine's compiler.)
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

__all__ = ["normal_", "CHUNKS", "MIN_PARALLEL"]

#: chunks per large fill (fixed, so results do not depend on the thread count)
CHUNKS = 8
#: below this many elements a fill is one plain normal_ (a hand-off costs ~0.1 ms)
MIN_PARALLEL = 1 << 18

_pool: Optional[ThreadPoolExecutor] = None
_pool_key = None
_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads (rebuilt after fork or a thread-count change:
    a pool inherited through fork has no threads behind it)."""
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _lock:
        if _pool_key != key:
            if _pool is not None and _pool_key[0] == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="furnace-normal")
            _pool_key = key
        return _pool


def normal_(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``x`` in place with i.i.d. N(0, 1) numbers; returns ``x``.

    Contiguous CPU tensors of at least ``MIN_PARALLEL`` elements take their numbers from
    ``CHUNKS`` seeds drawn from ``generator`` (default: torch's global CPU generator), one per
    chunk, filled concurrently. Other tensors are ``x.normal_(generator=generator)``.
    Reproducible under ``torch.manual_seed`` / ``generator.manual_seed`` and independent of
    the thread count.
    """
    n = x.numel()
    if x.device.type != "cpu" or not x.is_contiguous() or n < MIN_PARALLEL:
        return x.normal_(generator=generator)
    # 62-bit seeds from the caller's stream: one small draw advances it deterministically
    seeds = torch.randint(0, 2 ** 62, (CHUNKS,), generator=generator, dtype=torch.int64).tolist()
    flat = x.view(-1)
    step = -(-n // CHUNKS)

    def fill(k: int) -> None:
        flat[k * step:(k + 1) * step].normal_(generator=torch.Generator().manual_seed(seeds[k]))

    workers = min(CHUNKS, torch.get_num_threads())
    if workers <= 1:
        for k in range(CHUNKS):
            fill(k)
    else:
        list(_executor(workers).map(fill, range(CHUNKS)))
    return x
