"""U2PL's unreliable-pixel contrastive loss and its class-wise memory queues
(spec methods/U2PL.md 3.7; quirks 1 to 5 and 28 of section 8).

Per class c: anchors are confident student features (teacher probability of c above
``delta_p``) of low-entropy pixels of c; the positive is the mean teacher feature of those
pixels; negatives are teacher features drawn from queue c, a FIFO of features of pixels that
almost certainly are *not* c (c ranked ``low_rank``..``high_rank``-1 by the teacher). The loss
per anchor is InfoNCE with cosine similarity and temperature tau.

Two modes:

* ``reference`` (default), the released code: a labelled pixel never becomes a negative
  (its mask multiplies ``label == c`` by ``label != c``); an unlabelled negative of c must have
  pseudo label c; the loss loop takes anchors and prototype of class index k but negatives of
  queue ``valid_classes[k]``; 256 anchors x 50 negatives.
  Its labels enter as the one-hot of its ``label_onehot``, which holds the union of the
  batch's labels in image 0 and zeros elsewhere (:func:`label_onehot` with ``union=True``,
  spec 10.1), computed per reference GPU.
* ``paper`` (Eqs. 14-15 and Algorithm 1): labelled negatives of c are pixels with another
  label whose teacher ranks c among the top ``low_rank``; unlabelled negatives have no label
  condition; the loop uses the valid class ids; the prototype averages the anchors' teacher
  features; 50 anchors x 256 negatives (counts are the caller's choice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["MemoryBank", "ContrastiveStats", "ContrastiveMasks", "class_ranks",
           "label_onehot", "negative_masks", "contrastive_masks", "negative_keys",
           "contrastive_from_masks", "unreliable_contrastive_loss", "MODES"]

MODES = ("reference", "paper")


class MemoryBank:
    """C FIFO queues of D-dim features, queue c holding at most ``sizes[c]`` (the newest).

    ``push`` appends this step's keys of every class, gathered from all processes in rank
    order (so every rank holds the same queues), before the loss samples from them.
    """

    def __init__(self, sizes: Sequence[int], dim: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"queue sizes must be >= 1, got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.dim = int(dim)
        self.queues: List[torch.Tensor] = [torch.zeros(0, dim, device=device, dtype=dtype)
                                           for _ in sizes]

    def __len__(self) -> int:
        return len(self.queues)

    def lengths(self) -> List[int]:
        return [int(q.shape[0]) for q in self.queues]

    def push(self, keys: Sequence[torch.Tensor]) -> None:
        """Append keys[c] [n_c, D] (no grad) to queue c, all ranks' keys in rank order."""
        keys = gather_rows(keys)
        for c, k in enumerate(keys):
            if k.shape[0]:
                q = torch.cat([self.queues[c], k.detach().to(self.queues[c])])
                self.queues[c] = q[-self.sizes[c]:]

    def state_dict(self) -> Dict[str, object]:
        return {"sizes": list(self.sizes), "queues": [q.cpu() for q in self.queues]}

    def load_state_dict(self, state) -> None:
        if list(state["sizes"]) != self.sizes or len(state["queues"]) != len(self.queues):
            raise ValueError(f"memory bank: the checkpoint's queue sizes {list(state['sizes'])}"
                             f" differ from the config's {self.sizes}")
        self.queues = [q.to(self.queues[0]) for q in state["queues"]]


def gather_rows(rows: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """For each entry i, the rows of every process's ``rows[i]`` [n_i, D], concatenated in
    rank order. One count exchange and one padded all_gather for all entries together;
    without an initialised process group (or with one process) returns ``rows``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(rows)
    world = dist.get_world_size()
    flat = torch.cat(list(rows)).contiguous()
    counts = torch.tensor([r.shape[0] for r in rows], device=flat.device, dtype=torch.long)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    totals = [int(c.sum()) for c in all_counts]
    if max(totals) == 0:
        return list(rows)
    pad = flat.new_zeros(max(totals), flat.shape[1])
    pad[:flat.shape[0]] = flat
    all_flat = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(all_flat, pad)
    parts = [list(f[:t].split(c.tolist())) for f, t, c in zip(all_flat, totals, all_counts)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(rows))]


def class_ranks(prob: torch.Tensor) -> torch.Tensor:
    """Position of each class in the descending sort of ``prob`` along dim 1 (0 = argmax).

    prob [B,C,h,w] -> int64 [B,C,h,w]; ties keep the class order (stable sort)."""
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    return torch.argsort(order, dim=1)


def label_onehot(labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                 union: bool = False) -> torch.Tensor:
    """One-hot masks of int label maps: [B,h,w] -> bool [B,C,h,w]; ``ignore_index`` -> zeros.

    ``union=True`` is the reference's ``label_onehot`` (spec methods/U2PL.md 10.1): its
    scatter only ever writes batch slot 0, so image 0 holds at each pixel a 1 for every class
    that any image of the batch has there (the other images' ignored pixels counting as class
    0), cleared where image 0 itself is ignored, and images 1..B-1 are all zeros. With B = 1
    both are the same."""
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    if not union:
        return labels.unsqueeze(1) == classes
    filled = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    first = (filled.unsqueeze(1) == classes).any(dim=0) & (labels[0] != ignore_index)
    out = torch.zeros(labels.shape[0], num_classes, *labels.shape[1:], dtype=torch.bool,
                      device=labels.device)
    out[0] = first
    return out


def negative_masks(onehot_l: torch.Tensor, onehot_u: torch.Tensor, prob_l: torch.Tensor,
                   prob_u: torch.Tensor, high_u: torch.Tensor, mode: str = "reference",
                   low_rank: int = 3, high_rank: int = 20, delta_n: float = 1.0
                   ) -> torch.Tensor:
    """Which pixels' teacher features are negative keys of each class.

    onehot_l [Bl,C,h,w], onehot_u [Bu,C,h,w] (pseudo labels): bool :func:`label_onehot` maps;
    prob_l/prob_u [B,C,h,w] teacher softmax; high_u [Bu,h,w] bool: the unreliable
    (high-entropy) unlabelled pixels. Returns bool [Bl+Bu, C, h, w] (labelled first, as the
    features are stacked)."""
    rank_l, rank_u = class_ranks(prob_l), class_ranks(prob_u)
    valid_l = onehot_l.any(dim=1, keepdim=True)
    # labelled: another label, but the teacher ranks c among its top low_rank
    neg_l = valid_l & ~onehot_l & (rank_l < low_rank) & (prob_l < delta_n)
    # unlabelled: unreliable, and c ranked low_rank..high_rank-1 (unlikely, not impossible)
    neg_u = (high_u.unsqueeze(1) & (rank_u >= low_rank) & (rank_u < high_rank)
             & (prob_u < delta_n))
    if mode == "reference":
        # quirks 1 and 2: the code's mask also requires label == c, which empties the
        # labelled part and ties unlabelled negatives to their pseudo label
        neg_l = neg_l & onehot_l
        neg_u = neg_u & onehot_u
    elif mode != "paper":
        raise ValueError(f"contrastive mode must be one of {MODES}, got {mode!r}")
    return torch.cat([neg_l, neg_u])


@dataclass
class ContrastiveStats:
    """What one contrastive call did (for the log): valid classes V, anchors per class,
    classes that contributed a term, keys pushed per class."""

    valid_classes: List[int]
    anchors: List[int]
    used: int
    pushed: List[int]


@dataclass
class ContrastiveMasks:
    """The pixel masks of one (reference GPU) group, each bool [Bl+Bu, C, h, w], labelled
    images first: ``low_valid`` (anchor pool and prototype pixels of each class), ``anchor``
    (``low_valid`` and teacher probability above delta_p), ``negative`` (negative keys)."""

    low_valid: torch.Tensor
    anchor: torch.Tensor
    negative: torch.Tensor


def contrastive_masks(onehot_l: torch.Tensor, onehot_u: torch.Tensor, prob_l: torch.Tensor,
                      prob_u: torch.Tensor, low_u: torch.Tensor, high_u: torch.Tensor, *,
                      mode: str = "reference", low_rank: int = 3, high_rank: int = 20,
                      delta_p: float = 0.3, delta_n: float = 1.0) -> ContrastiveMasks:
    """The masks of one group. onehot_l [Bl,C,h,w], onehot_u [Bu,C,h,w]: bool
    :func:`label_onehot` of the labels and pseudo labels at feature resolution; prob_l
    [Bl,C,h,w], prob_u [Bu,C,h,w]: teacher softmax there; low_u, high_u [Bu,h,w] bool: the
    unlabelled anchor pool and unreliable pixels (see :func:`unreliable_contrastive_loss`)."""
    with torch.no_grad():
        prob = torch.cat([prob_l, prob_u])
        # labelled pixels are all in the pool; the one-hot already zeroes ignored ones
        low_valid = torch.cat([onehot_l, onehot_u & low_u.unsqueeze(1)])
        neg = negative_masks(onehot_l, onehot_u, prob_l, prob_u, high_u, mode, low_rank,
                             high_rank, delta_n)
        return ContrastiveMasks(low_valid, low_valid & (prob > delta_p), neg)


def negative_keys(rep_teacher: torch.Tensor, masks: ContrastiveMasks) -> List[torch.Tensor]:
    """This group's new queue entries: per class c the teacher features [n_c, D] of its
    negative pixels (rep_teacher [B,D,h,w])."""
    feats_t = rep_teacher.detach().permute(0, 2, 3, 1)
    return [feats_t[masks.negative[:, c]] for c in range(masks.negative.shape[1])]


def contrastive_from_masks(rep: torch.Tensor, rep_teacher: torch.Tensor,
                           masks: ContrastiveMasks, bank: MemoryBank, *,
                           mode: str = "reference", num_queries: int = 256,
                           num_negatives: int = 50, temperature: float = 0.5,
                           generator: Optional[torch.Generator] = None):
    """The loss of one group from its masks, sampling keys from ``bank`` (already holding
    this step's keys). rep [B,D,h,w] with grad, rep_teacher the same without. Returns
    (loss 0-d with grad into ``rep`` only, :class:`ContrastiveStats`)."""
    C = masks.low_valid.shape[1]
    D = rep.shape[1]
    feats = rep.permute(0, 2, 3, 1)                                  # [B2,h,w,D]
    feats_t = rep_teacher.detach().permute(0, 2, 3, 1)
    # per-class counts in one host transfer (not 3 C synchronisations per step)
    pushed, n_low, n_anchor = torch.stack(
        [m.sum(dim=(0, 2, 3)) for m in (masks.negative, masks.low_valid, masks.anchor)]
    ).tolist()
    valid = [c for c in range(C) if n_low[c] > 0]
    stats = ContrastiveStats(valid, [n_anchor[c] for c in valid], 0, pushed)
    zero = rep.sum() * 0
    if len(valid) <= 1:
        return zero, stats

    total = zero
    for k, q in enumerate(valid):
        # quirk 3 (reference): anchors and prototype of class index k, negatives of queue q
        a = k if mode == "reference" else q
        queue = bank.queues[q]
        if n_anchor[a] == 0 or queue.shape[0] == 0:
            continue
        anchors_all = feats[masks.anchor[:, a]]
        with torch.no_grad():
            pool = masks.low_valid[:, a] if mode == "reference" else masks.anchor[:, a]
            proto = feats_t[pool].mean(0)
            idx = torch.randint(anchors_all.shape[0], (num_queries,), generator=generator)
            kidx = torch.randint(queue.shape[0], (num_queries * num_negatives,),
                                 generator=generator)
            keys = queue[kidx.to(queue.device)].view(num_queries, num_negatives, D)
            keys = torch.cat([proto.view(1, 1, D).expand(num_queries, 1, D),
                              keys.to(feats_t)], dim=1)
        anchors = anchors_all[idx.to(anchors_all.device)]
        sim = F.cosine_similarity(anchors.unsqueeze(1), keys, dim=2)  # [Q, 1+N]
        target = torch.zeros(num_queries, dtype=torch.long, device=sim.device)
        total = total + F.cross_entropy(sim / temperature, target)
        stats.used += 1
    return total / len(valid), stats


def unreliable_contrastive_loss(rep: torch.Tensor, rep_teacher: torch.Tensor,
                                label_l: torch.Tensor, label_u: torch.Tensor,
                                prob_l: torch.Tensor, prob_u: torch.Tensor,
                                low_u: torch.Tensor, high_u: torch.Tensor, bank: MemoryBank,
                                *, mode: str = "reference", union: bool = False,
                                low_rank: int = 3, high_rank: int = 20, delta_p: float = 0.3,
                                delta_n: float = 1.0, num_queries: int = 256,
                                num_negatives: int = 50, temperature: float = 0.5,
                                ignore_index: int = 255,
                                generator: Optional[torch.Generator] = None):
    """The contrastive loss of one group (one reference GPU; the caller weights it).

    Args:
        rep: student features [Bl+Bu, D, h, w] (labelled first), with grad.
        rep_teacher: teacher features, same shape (no grad).
        label_l [Bl,h,w], label_u [Bu,h,w]: labels and pseudo labels at feature resolution.
        prob_l [Bl,C,h,w], prob_u [Bu,C,h,w]: teacher softmax at feature resolution.
        low_u, high_u [Bu,h,w] bool: unlabelled anchor pool (reference: the lowest alpha_t %
            entropy; paper: the reliable pixels) and unreliable pixels (negatives).
        bank: the memory queues; this step's keys are pushed before sampling.
        union: the reference's one-hot (:func:`label_onehot`, union in image 0).
        generator: CPU generator for the anchor and key draws (default: torch's global one).
    Returns:
        (loss 0-d with grad into ``rep`` only, :class:`ContrastiveStats`).
    """
    C = prob_l.shape[1]
    masks = contrastive_masks(label_onehot(label_l, C, ignore_index, union),
                              label_onehot(label_u, C, ignore_index, union),
                              prob_l, prob_u, low_u, high_u, mode=mode, low_rank=low_rank,
                              high_rank=high_rank, delta_p=delta_p, delta_n=delta_n)
    bank.push(negative_keys(rep_teacher, masks))
    return contrastive_from_masks(rep, rep_teacher, masks, bank, mode=mode,
                                  num_queries=num_queries, num_negatives=num_negatives,
                                  temperature=temperature, generator=generator)
