"""LPL's VOC lists (spec methods/LPL.md 6.2, 10.2 item 1): the labelled subsets and the ordered
full list D.

    python -m furnace.data.lpl_splits --full $DATA/pascal_voc/train_aug.txt \\
        --train exp_voc/splits_u2pl/1464/labeled.txt --out DIR [--sizes 92 183 366 732 1464]

writes DIR/lpl_labeled_<N>.txt for every N of --sizes (the first N ids of --train, in its
order) and DIR/lpl_all.txt (D: every id of --train in its order, then every other id of
--full in --full's order; 10582 lines for VOC). Lines are --full's lines (the CPS list
format). The reference's --train is VOC2012 ImageSets/Segmentation/train.txt, which the CPS
archive lacks; it is sorted by id, and so is U2PL's pascal/1464/labeled.txt (the same 1464
ids), so that file stands in for it. A --train list that is not sorted is used in its own
order, with a note (the reference's subsets are the first N of the sorted train.txt).

Train with ``train_source=<DIR>/lpl_labeled_<N>.txt unsup_source=<DIR>/lpl_all.txt
voc_train_folder=train_aug`` (the names do not contain 'train', so VOC needs the folder).
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .datasets import DataError, read_list_file
from .u2pl_splits import sample_key, u2pl_pair, write_lists

#: the reference's labelled subset sizes (the first N ids of train.txt)
LPL_SIZES = (92, 183, 366, 732, 1464)
ALL_NAME = "lpl_all.txt"


def labeled_name(n: int) -> str:
    """File name of the labelled subset of size n."""
    return f"lpl_labeled_{n}.txt"


def lpl_lists(train: Sequence[Tuple[int, str]], full: Sequence[Tuple[int, str]],
              sizes: Sequence[int], train_path: str = "train list",
              full_path: str = "full list") -> Tuple[Dict[int, List[str]], List[str]]:
    """({N: the first N lines of D}, D).

    train, full: (line number, line) pairs as :func:`read_list_file` returns (VOC ids; the
    CPS list format). D = the train ids in train order, then the other full-list ids in
    full-list order, each as its full-list line. A train id missing from the full list, a
    repeated id, and a size outside [1, len(train)] raise DataError.
    """
    _, rest = u2pl_pair(train, full, "voc", train_path, full_path)  # checks ids, duplicates
    line_of = {sample_key(line, "voc"): line for _, line in full}
    head = [line_of[sample_key(line, "voc")] for _, line in train]
    for n in sizes:
        if isinstance(n, bool) or int(n) != n or not 1 <= n <= len(head):
            raise DataError(f"--sizes {n}: a labelled subset size must be an integer in "
                            f"[1, {len(head)}] (the entries of {train_path})")
    return {int(n): head[:int(n)] for n in sizes}, head + rest


def is_sorted(lines: Sequence[Tuple[int, str]]) -> bool:
    """Whether the ids of a VOC list are in ascending order."""
    ids = [sample_key(line, "voc") for _, line in lines]
    return ids == sorted(ids)


def write_lpl_lists(train_list: str, full_list: str, out_dir: str,
                    sizes: Sequence[int] = LPL_SIZES) -> Dict[str, str]:
    """Write lpl_labeled_<N>.txt for every N of ``sizes`` and lpl_all.txt into ``out_dir``;
    returns {file name: path}."""
    train, full = read_list_file(train_list), read_list_file(full_list)
    subsets, d = lpl_lists(train, full, sizes, train_list, full_list)
    files = [(labeled_name(n), lines) for n, lines in subsets.items()] + [(ALL_NAME, d)]
    paths = write_lists(out_dir, files, [train_list, full_list])
    return {name: p for (name, _), p in zip(files, paths)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m furnace.data.lpl_splits",
        description="Write LPL's labelled subsets (the first N ids of VOC train.txt) and its "
                    "ordered full list D (train.txt, then the rest of train_aug.txt).")
    ap.add_argument("--full", required=True, help="our full training list (VOC train_aug.txt)")
    ap.add_argument("--train", required=True,
                    help="VOC train.txt, or U2PL's exp_voc/splits_u2pl/1464/labeled.txt (the "
                         "same 1464 ids, sorted)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(LPL_SIZES),
                    help="labelled subset sizes N (default: %(default)s)")
    a = ap.parse_args(argv)
    try:
        if not is_sorted(read_list_file(a.train)):
            print(f"note: {a.train} is not sorted by id; its first N entries are taken in its "
                  f"own order (the reference's train.txt is sorted)", file=sys.stderr)
        out = write_lpl_lists(a.train, a.full, a.out, a.sizes)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, p in out.items():
        with open(p) as f:
            print(f"{name}: {sum(1 for _ in f)} lines -> {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
