"""Reference groups: the per-GPU batches of a method's reference run, whatever our launch.

A reference's numbers depend on how it batched: per-GPU quantities (entropy percentiles,
contrastive pools, OHEM's min_kept, BatchNorm without SyncBN) are part of its method. The
config key ``reference_gpus`` gives the reference's GPU count W; the global batch of each
stream is split into W groups of ``batch_size / W`` images, and each process holds
``W / world_size`` whole groups, so 1 process x 4 groups, 2 x 2 and 4 x 1 compute alike.
``reference_gpus=None`` means one group per process (the run's own batching).

Torch-free: the engine builds a :class:`ReferenceGroups` for each process and passes it to the
method in its context; the method splits its per-process batch with :meth:`slices`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


class GroupError(ValueError):
    """A launch whose batch does not split into whole reference groups."""


@dataclass(frozen=True)
class ReferenceGroups:
    """The reference groups of one process's batch.

    ``per_process``: groups in this process's batch; ``first``: global index of its first
    group (``rank * per_process``); ``total``: the reference's GPU count W.
    """
    per_process: int = 1
    first: int = 0
    total: int = 1

    @property
    def indices(self) -> range:
        """Global indices of this process's groups, in batch order."""
        return range(self.first, self.first + self.per_process)

    def slices(self, n: int) -> List[slice]:
        """The index ranges of the groups of a batch of ``n`` images, in batch order."""
        if n % self.per_process:
            raise GroupError(f"a batch of {n} images does not split into {self.per_process} "
                             "reference groups")
        size = n // self.per_process
        return [slice(g * size, (g + 1) * size) for g in range(self.per_process)]


def reference_groups(reference_gpus: Optional[int], batch_size: int, world_size: int = 1,
                     rank: int = 0) -> ReferenceGroups:
    """The groups of process ``rank`` of ``world_size`` for the global ``batch_size`` (per
    stream). Raises :class:`GroupError` (one line, naming the key and the fix) when the
    batch or the launch does not split into whole groups."""
    W = int(reference_gpus) if reference_gpus is not None else int(world_size)
    if W < 1:
        raise GroupError(f"config key 'reference_gpus' must be >= 1, got {reference_gpus}")
    if batch_size % W:
        raise GroupError(f"config batch_size={batch_size} does not split into "
                         f"reference_gpus={W} groups; choose a batch_size that is a multiple "
                         f"of {W} (the reference's per-GPU batch times its GPU count)")
    if W % world_size:
        fits = [p for p in range(1, W + 1) if W % p == 0]
        raise GroupError(f"reference_gpus={W} groups cannot be shared by {world_size} "
                         f"processes; launch {', '.join(map(str, fits))} processes "
                         "(each holds whole groups), or change reference_gpus")
    per = W // world_size
    return ReferenceGroups(per_process=per, first=rank * per, total=W)


def group_seed(seed: int, iteration: int, group: int) -> int:
    """The seed of one reference group's random draws at one iteration: a function of the run
    seed, the iteration and the global group index only, so the draws do not depend on how
    the groups are spread over processes, and a resumed run draws the same."""
    return ((int(seed) * 1_000_003 + int(iteration)) * 1_009 + int(group)) % 2 ** 63
