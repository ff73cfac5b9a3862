"""Turn ELN's labelled split lists into our labelled/unlabelled list pairs.

    python -m furnace.data.eln_splits --full LIST --labeled ELN_LIST [ELN_LIST ...]
                                      --out DIR [--layout voc|city]

ELN's lists (kinux98/SSL_ELN; shipped unchanged in exp_voc/splits_eln and
exp_city/splits_eln) are named ``<ratio>_labeled_<set>.txt``: VOC ids (``2007_000032``) or
Cityscapes ``<city>/<city>_<seq>_<frame>`` lines. In the reference every unlabelled list is
exactly the rest of the full training list (VOC: the 10,582 ``trainaug`` ids; Cityscapes: the
2,975 ``train.txt`` lines; checked for every ratio and set), so only the labelled lists are
shipped and the unlabelled one is written as the complement. For each list this writes
DIR/train_aug_labeled_eln-<ratio>-<set>.txt and DIR/train_aug_unlabeled_eln-<ratio>-<set>.txt,
both holding lines of the full list (our CPS-layout form) in full-list order; the names
contain 'train', so VOC reads train_aug/. Train with ``--set
train_source=DIR/train_aug_labeled_eln-20-0.txt unsup_source=DIR/...`` (relative to
dataset_path).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, Optional, Sequence, Tuple

from .datasets import DataError, read_list_file
from .u2pl_splits import LAYOUTS, detect_layout, u2pl_pair

_NAME = re.compile(r"^(?P<ratio>\d+)_labeled_(?P<set>\d+)\.txt$")


def pair_file_names(list_path: str) -> Tuple[str, str]:
    """(labelled, unlabelled) output names for ELN's ``<ratio>_labeled_<set>.txt``."""
    m = _NAME.match(os.path.basename(list_path))
    if m is None:
        raise DataError(f"--labeled {list_path}: ELN's lists are named "
                        "<ratio>_labeled_<set>.txt (e.g. 20_labeled_0.txt)")
    tag = f"eln-{m.group('ratio')}-{m.group('set')}"
    return f"train_aug_labeled_{tag}.txt", f"train_aug_unlabeled_{tag}.txt"


def write_eln_pairs(labeled_lists: Sequence[str], full_list: str, out_dir: str,
                    layout: Optional[str] = None) -> Dict[str, Tuple[str, str]]:
    """Write one list pair per ELN labelled list; returns {labelled list: (lab, unlab)}."""
    full = read_list_file(full_list)
    layout = layout or detect_layout([l for _, l in full])
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file; it must name a folder for the lists")
    parts = {}
    for path in labeled_lists:
        names = pair_file_names(path)
        lab, unlab = u2pl_pair(read_list_file(path), full, layout, path, full_list)
        parts[path] = (names, lab, unlab)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out folder {out_dir}: {e.strerror}") from e
    out = {}
    for path, (names, lab, unlab) in parts.items():
        written = []
        for name, lines in zip(names, (lab, unlab)):
            p = os.path.join(out_dir, name)
            with open(p, "w", encoding="utf-8", newline="\n") as f:
                f.write("".join(x + "\n" for x in lines))
            written.append(p)
        out[path] = tuple(written)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m furnace.data.eln_splits",
        description="Write our labelled/unlabelled list pair for ELN's labelled split lists.")
    ap.add_argument("--full", required=True,
                    help="our full training list (VOC train_aug.txt, Cityscapes train.txt)")
    ap.add_argument("--labeled", required=True, nargs="+",
                    help="ELN labelled list(s), e.g. exp_voc/splits_eln/20_labeled_0.txt")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--layout", choices=LAYOUTS, default=None,
                    help="line format (default: from the full list)")
    a = ap.parse_args(argv)
    try:
        out = write_eln_pairs(a.labeled, a.full, a.out, a.layout)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for src, (pl, pu) in out.items():
        with open(pl) as f:
            nl = sum(1 for _ in f)
        with open(pu) as f:
            nu = sum(1 for _ in f)
        print(f"{src}: {nl} labelled -> {pl}; {nu} unlabelled -> {pu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
