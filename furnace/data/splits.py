"""Labelled/unlabelled split tool.

    python -m furnace.data.splits --full LIST --out DIR --ratios 2 4 8 16 --seed 0 [--layout voc|city]

writes DIR/train_aug_labeled_1-N.txt and DIR/train_aug_unlabeled_1-N.txt for each N. The
labelled part of 1/N has ceil(len/N) lines (as the CPS files: VOC 10582 -> 662/1323/2646/5291,
Cityscapes 2975 -> 186/372/744/1488), drawn from one seeded permutation so that smaller
labelled sets are nested in larger ones. Lines are copied verbatim (line endings normalised to
LF) and keep the order of the full list.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .datasets import DataError, read_list_file


def split_file_names(ratio: int) -> Tuple[str, str]:
    """(labelled, unlabelled) file names of the 1/ratio split."""
    return f"train_aug_labeled_1-{ratio}.txt", f"train_aug_unlabeled_1-{ratio}.txt"


def make_splits(lines: Sequence[str], ratios: Sequence[int] = (2, 4, 8, 16),
                seed: int = 0) -> Dict[int, Tuple[List[str], List[str]]]:
    """Split `lines` into labelled/unlabelled parts for each ratio.

    Args:
        lines: entries of the full list (non-empty strings, unique).
        ratios: N values (ints >= 1); the labelled part of 1/N has ceil(len/N) entries.
        seed: permutation seed (numpy RandomState).
    Returns:
        {N: (labelled lines, unlabelled lines)}, both in the order of `lines`; their union is
        `lines` and they do not overlap.
    """
    lines = [str(l) for l in lines]
    if not lines:
        raise DataError("cannot split an empty list")
    seen = set()
    dups = [l for l in lines if l in seen or seen.add(l)]
    if dups:
        raise DataError(f"the full list has duplicate entries, e.g. {dups[0]!r}; remove them "
                        f"so labelled and unlabelled splits cannot overlap")
    n = len(lines)
    order = np.random.RandomState(int(seed)).permutation(n)
    out = {}
    for r in ratios:
        r = int(r)
        if r < 1:
            raise DataError(f"split ratio must be an integer >= 1, got {r}")
        k = math.ceil(n / r)
        chosen = np.zeros(n, dtype=bool)
        chosen[order[:k]] = True
        out[r] = ([l for l, c in zip(lines, chosen) if c],
                  [l for l, c in zip(lines, chosen) if not c])
    return out


def _check_layout(lines: Sequence[str], layout: str, path: str) -> None:
    for i, l in enumerate(lines):
        cols = l.split("\t")
        if layout == "city" and (len(cols) != 2 or not all(c.strip() for c in cols)):
            raise DataError(f"{path}: line {i + 1} {l!r} is not '<image><TAB><label>'")
        if layout == "voc" and "\t" in l and "./" not in l:
            raise DataError(f"{path}: line {i + 1} {l!r} has a tab but VOC lists hold one id "
                            f"per line (use --layout city for two-column lists)")


def write_splits(full_list: str, out_dir: str, ratios: Sequence[int] = (2, 4, 8, 16),
                 seed: int = 0, layout: Optional[str] = None) -> Dict[int, Tuple[str, str]]:
    """Read `full_list`, write the split files to `out_dir`; returns {N: (lab path, unlab path)}.

    `layout` ('voc' | 'city' | None = auto) only validates the line format.
    """
    lines = [l for _, l in read_list_file(full_list)]
    if layout is None:
        layout = "city" if all("\t" in l for l in lines) else "voc"
    if layout not in ("voc", "city"):
        raise DataError(f"--layout must be 'voc' or 'city', got {layout!r}")
    _check_layout(lines, layout, full_list)
    splits = make_splits(lines, ratios, seed)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file; it must name a folder for the split lists "
                        f"(e.g. subset_train_aug)")
    outputs = [os.path.join(out_dir, name) for r in splits for name in split_file_names(r)]
    for p in outputs:
        # the input would be truncated by the first write, losing the full list
        if os.path.exists(p) and os.path.samefile(p, full_list):
            raise DataError(f"--full {full_list} is one of the files --out {out_dir} would "
                            f"write ({os.path.basename(p)}); refusing to overwrite the input. "
                            f"Copy the full list elsewhere or choose another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out folder {out_dir}: {e.strerror}; choose a "
                        f"writable folder") from e
    paths = {}
    for r, (lab, unlab) in splits.items():
        ln, un = split_file_names(r)
        pl, pu = os.path.join(out_dir, ln), os.path.join(out_dir, un)
        for p, part in ((pl, lab), (pu, unlab)):
            try:
                with open(p, "w", encoding="utf-8", newline="\n") as f:
                    f.write("".join(x + "\n" for x in part))
            except OSError as e:
                raise DataError(f"cannot write split list {p}: {e.strerror}") from e
        paths[r] = (pl, pu)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m furnace.data.splits",
                                 description="Write labelled/unlabelled 1/N split lists.")
    ap.add_argument("--full", required=True, help="full training list (e.g. train_aug.txt)")
    ap.add_argument("--out", required=True, help="output folder (e.g. subset_train_aug)")
    ap.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=["voc", "city"], default=None,
                    help="line format to validate (default: auto)")
    a = ap.parse_args(argv)
    try:
        paths = write_splits(a.full, a.out, a.ratios, a.seed, a.layout)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, (pl, pu) in sorted(paths.items()):
        nl = sum(1 for _ in open(pl))
        nu = sum(1 for _ in open(pu))
        print(f"1/{r}: {nl} labelled -> {pl}; {nu} unlabelled -> {pu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
