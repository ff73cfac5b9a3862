"""Standard normal fills that use every CPU thread.

torch's CPU ``normal_`` runs on one thread (one mt19937 stream under a lock), so for the
aleatoric loss, which draws T x [C, valid pixels] normals per call, the draws become the
largest serial share of the step once the arithmetic runs on several threads.  Here a large
CPU tensor is cut into a fixed number of chunks, each chunk gets its own generator seeded from
the caller's generator, and the chunks are filled concurrently (ATen releases the GIL).

The result depends only on the caller's generator state, never on the thread count: the chunk
layout and the seeds are the same whether the chunks run on 1 or 16 threads.  The numbers are
i.i.d. N(0, 1) like ``normal_``'s, from a different stream.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

__all__ = ["normal_", "CHUNKS", "MIN_PARALLEL"]

#: chunks per fill (fixed, so results do not depend on the thread count)
CHUNKS = 8
#: below this many elements a fill is a plain ``normal_`` (thread hand-off costs ~0.1 ms)
MIN_PARALLEL = 1 << 18

_pool: Optional[ThreadPoolExecutor] = None
_pool_key = None
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads (rebuilt after fork or a thread-count change:
    a pool inherited through fork has no threads behind it)."""
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _pool_lock:
        if _pool_key != key:
            if _pool is not None and _pool_key[0] == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="furnace-normal")
            _pool_key = key
        return _pool


def normal_(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``x`` in place with i.i.d. N(0, 1) numbers; returns ``x``.

    CPU tensors of at least ``MIN_PARALLEL`` contiguous elements are filled in ``CHUNKS``
    chunks with generators seeded from ``generator`` (default: torch's global CPU generator),
    concurrently on up to ``torch.get_num_threads()`` threads; anything else is
    ``x.normal_(generator=generator)``.  Reproducible under ``torch.manual_seed`` /
    ``generator.manual_seed`` and independent of the thread count.
    """
    n = x.numel()
    if x.device.type != "cpu" or n < MIN_PARALLEL or not x.is_contiguous():
        return x.normal_(generator=generator)
    # 62-bit seeds from the caller's stream: one small draw advances it deterministically
    seeds = torch.randint(0, 2 ** 62, (CHUNKS,), generator=generator, dtype=torch.int64).tolist()
    flat = x.view(-1)
    step = -(-n // CHUNKS)

    def fill(k: int) -> None:
        g = torch.Generator()
        g.manual_seed(seeds[k])
        flat[k * step:(k + 1) * step].normal_(generator=g)

    workers = min(CHUNKS, torch.get_num_threads())
    if workers <= 1:
        for k in range(CHUNKS):
            fill(k)
    else:
        list(_executor(workers).map(fill, range(CHUNKS)))
    return x
