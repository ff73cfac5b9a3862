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

import os
import re
import sys
from typing import Dict, Optional, Sequence, Tuple

from .datasets import DataError
from .u2pl_splits import split_cli, write_pairs

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
    return write_pairs(labeled_lists, full_list, out_dir, layout,
                       lambda path, _lab: pair_file_names(path))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return split_cli(argv, "python -m furnace.data.eln_splits", "ELN's",
                     "exp_voc/splits_eln/20_labeled_0.txt", write_eln_pairs)


if __name__ == "__main__":
    sys.exit(main())
