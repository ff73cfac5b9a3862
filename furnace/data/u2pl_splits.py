"""Turn a U2PL labelled split list into our labelled/unlabelled list pair.

    python -m furnace.data.u2pl_splits --full LIST --labeled U2PL_LIST [U2PL_LIST ...]
                                       --out DIR [--layout voc|city]

For each U2PL list (e.g. exp_voc/splits_u2pl/1464/labeled.txt) writes
DIR/train_aug_labeled_u2pl-<n>.txt and DIR/train_aug_unlabeled_u2pl-<n>.txt, n = the number of
labelled entries. Both hold lines of the full list (our CPS-layout form), in full-list order;
the unlabelled list is the full list minus the labelled entries, as U2PL's own unlabeled.txt
(10582 - n for VOC, 2975 - n for Cityscapes). Use them with
``--set train_source=DIR/train_aug_labeled_u2pl-<n>.txt unsup_source=DIR/...``; the names
contain 'train', so VOC reads train_aug/ without voc_train_folder.

Entries are matched by sample name: VOC lines by their id (first column), Cityscapes lines by
``<city>_<seq>_<frame>``, from U2PL lines (``leftImg8bit/train/<city>/<name>_leftImg8bit.png``)
or CPS lines (``/images/train/<name>.png<TAB>...``) alike.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .datasets import DataError, read_list_file, u2pl_city_entry

LAYOUTS = ("voc", "city")


def pair_file_names(n: int) -> Tuple[str, str]:
    """(labelled, unlabelled) file names for a U2PL split of n labelled images."""
    return f"train_aug_labeled_u2pl-{n}.txt", f"train_aug_unlabeled_u2pl-{n}.txt"


def sample_key(line: str, layout: str, where: str = "") -> str:
    """The sample name a list line stands for ('voc': the id; 'city': ``<city>_<seq>_<frame>``).

    ``where`` (file:line) goes into the DataError of a malformed line.
    """
    first = line.split("\t")[0].strip()
    if layout == "voc":
        if not first or "/" in first:
            raise DataError(f"list entry {where} {line!r} is not a VOC id such as 2007_000032 "
                            f"(pass --layout city for Cityscapes lists)")
        return first
    u2pl = u2pl_city_entry(first, where)
    image = u2pl[0] if u2pl is not None else first
    name = os.path.splitext(os.path.basename(image))[0]
    if not name:
        raise DataError(f"list entry {where} {line!r} names no image")
    return name


def detect_layout(full_lines: Sequence[str]) -> str:
    """'city' when every full-list line has two tab-separated columns or a U2PL Cityscapes
    path, else 'voc'."""
    city = all("\t" in l or "leftImg8bit" in l for l in full_lines)
    return "city" if city else "voc"


def u2pl_pair(labeled: Sequence[Tuple[int, str]], full: Sequence[Tuple[int, str]], layout: str,
              labeled_path: str = "labelled list", full_path: str = "full list"
              ) -> Tuple[List[str], List[str]]:
    """(labelled lines, unlabelled lines) of the full list, both in full-list order.

    labeled, full: (line number, line) pairs as :func:`read_list_file` returns. Raises
    DataError for a labelled entry missing from the full list, or duplicates in either list.
    """
    if layout not in LAYOUTS:
        raise DataError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    index: Dict[str, int] = {}
    for ln, line in full:
        key = sample_key(line, layout, f"{full_path}:{ln}")
        if key in index:
            raise DataError(f"{full_path}:{ln} repeats sample {key!r} (first at line "
                            f"{index[key]}); remove the duplicate")
        index[key] = ln
    chosen: Dict[str, int] = {}
    for ln, line in labeled:
        key = sample_key(line, layout, f"{labeled_path}:{ln}")
        if key not in index:
            raise DataError(f"{labeled_path}:{ln} sample {key!r} is not in the full list "
                            f"{full_path}; pass the full training list of the same dataset "
                            f"(VOC: train_aug.txt, 10582 ids; Cityscapes: train.txt, 2975 lines)")
        if key in chosen:
            raise DataError(f"{labeled_path}:{ln} repeats sample {key!r} (first at line "
                            f"{chosen[key]}); remove the duplicate")
        chosen[key] = ln
    lab, unlab = [], []
    for ln, line in full:
        (lab if sample_key(line, layout) in chosen else unlab).append(line)
    return lab, unlab


def write_pairs(labeled_lists: Sequence[str], full_list: str, out_dir: str,
                layout: Optional[str],
                names_of: Callable[[str, List[str]], Tuple[str, str]],
                ) -> Dict[str, Tuple[str, str]]:
    """Write one labelled/unlabelled list pair per labelled list of a reference (U2PL, ELN):
    the labelled entries and the rest of the full list, both as full-list lines in full-list
    order. ``names_of(list path, labelled lines)``: the pair's two file names. Two lists
    that would write the same files, or an output that is one of the inputs, are a
    DataError before anything is written. Returns {labelled list: (lab path, unlab path)}.
    """
    full = read_list_file(full_list)
    layout = layout or detect_layout([l for _, l in full])
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file; it must name a folder for the lists")
    pairs, names = {}, {}
    for path in labeled_lists:
        lab, unlab = u2pl_pair(read_list_file(path), full, layout, path, full_list)
        pair_names = names_of(path, lab)
        if pair_names in names:
            raise DataError(f"--labeled {path} and {names[pair_names]} would both write "
                            f"{pair_names[0]}; convert them into different --out folders")
        names[pair_names] = path
        pairs[path] = (lab, unlab, pair_names)
    files = [(name, part) for lab, unlab, (ln, un) in pairs.values()
             for name, part in ((ln, lab), (un, unlab))]
    written = iter(write_lists(out_dir, files, [full_list, *labeled_lists]))
    return {path: (next(written), next(written)) for path in pairs}


def write_lists(out_dir: str, files: Sequence[Tuple[str, Sequence[str]]],
                inputs: Sequence[str]) -> List[str]:
    """Write list files ``out_dir/<name>``, one line per entry, for (name, lines) pairs;
    returns their paths in order. An output that is one of ``inputs``, an ``out_dir`` that
    is a file or cannot be made, and a failed write are DataErrors; the input check runs
    before anything is written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file; it must name a folder for the lists")
    for name, _ in files:
        p = os.path.join(out_dir, name)
        if os.path.exists(p) and any(os.path.samefile(p, i) for i in inputs):
            raise DataError(f"--out {out_dir} would overwrite the input {p}; choose "
                            f"another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out folder {out_dir}: {e.strerror}") from e
    written = []
    for name, part in files:
        p = os.path.join(out_dir, name)
        try:
            with open(p, "w", encoding="utf-8", newline="\n") as f:
                f.write("".join(x + "\n" for x in part))
        except OSError as e:
            raise DataError(f"cannot write list {p}: {e.strerror}") from e
        written.append(p)
    return written


def write_u2pl_pairs(labeled_lists: Sequence[str], full_list: str, out_dir: str,
                     layout: Optional[str] = None) -> Dict[str, Tuple[str, str]]:
    """Write one list pair per U2PL labelled list; returns {labelled list: (lab, unlab paths)}.

    ``layout``: 'voc' | 'city' | None (from the full list, see :func:`detect_layout`).
    """
    return write_pairs(labeled_lists, full_list, out_dir, layout,
                       lambda _path, lab: pair_file_names(len(lab)))


def split_cli(argv: Optional[Sequence[str]], prog: str, reference: str, example: str,
              write: Callable[..., Dict[str, Tuple[str, str]]]) -> int:
    """The command line of a reference's split converter (exit 0, or 2 with one error line)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description=f"Write our labelled/unlabelled list pair for {reference} labelled split "
                    "lists.")
    ap.add_argument("--full", required=True,
                    help="our full training list (VOC train_aug.txt, Cityscapes "
                         "config_new/train.txt)")
    ap.add_argument("--labeled", required=True, nargs="+",
                    help=f"{reference} labelled list(s), e.g. {example}")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--layout", choices=LAYOUTS, default=None,
                    help="line format (default: from the full list)")
    a = ap.parse_args(argv)
    try:
        out = write(a.labeled, a.full, a.out, a.layout)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    return split_cli(argv, "python -m furnace.data.u2pl_splits", "U2PL",
                     "exp_voc/splits_u2pl/1464/labeled.txt", write_u2pl_pairs)


if __name__ == "__main__":
    sys.exit(main())
