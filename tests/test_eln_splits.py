"""ELN's split lists (exp_voc/splits_eln, exp_city/splits_eln, shipped unchanged from the
reference) and their conversion into our labelled/unlabelled list pairs."""
import re

import pytest

from conftest import ROOT
from furnace.data.datasets import DataError
from furnace.data.eln_splits import main, pair_file_names, write_eln_pairs

VOC = {"20": 530, "8": 1322, "4": 2645}
CITY = {"8": 371, "4": 743, "2": 1487}


def _ids(path):
    return [l.strip() for l in path.read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("folder,counts,pattern", [
    ("exp_voc", VOC, r"^\d{4}_\d{6}$"),
    ("exp_city", CITY, r"^([a-z_]+)/\1_\d{6}_\d{6}$")])
def test_shipped_lists(folder, counts, pattern):
    for ratio, n in counts.items():
        for s in range(3):
            ids = _ids(ROOT / folder / "splits_eln" / f"{ratio}_labeled_{s}.txt")
            assert len(ids) == len(set(ids)) == n
            assert all(re.match(pattern, i) for i in ids)


def test_voc_pair_is_the_complement(tmp_path):
    lab = ROOT / "exp_voc" / "splits_eln" / "20_labeled_1.txt"
    ids = _ids(lab)
    extra = [f"2099_{i:06d}" for i in range(40)]
    full = tmp_path / "train_aug.txt"
    full.write_text("\n".join(sorted(ids + extra)) + "\n")
    out = write_eln_pairs([str(lab)], str(full), str(tmp_path / "splits"))
    pl, pu = out[str(lab)]
    assert pl.endswith("train_aug_labeled_eln-20-1.txt")
    assert pu.endswith("train_aug_unlabeled_eln-20-1.txt")
    assert sorted(_ids(tmp_path / "splits" / "train_aug_labeled_eln-20-1.txt")) == sorted(ids)
    assert _ids(tmp_path / "splits" / "train_aug_unlabeled_eln-20-1.txt") == extra


def test_city_lines_match_cps_lines(tmp_path, capsys):
    lab = ROOT / "exp_city" / "splits_eln" / "8_labeled_0.txt"
    names = [i.split("/")[1] for i in _ids(lab)] + ["zurich_000999_000019"]
    full = tmp_path / "train.txt"
    full.write_text("".join(f"/images/train/{n}.png\t/segmentation/train/{n}_gtFine.png\n"
                            for n in names))
    assert main(["--full", str(full), "--labeled", str(lab), "--out",
                 str(tmp_path / "out")]) == 0
    assert "371 labelled" in capsys.readouterr().out
    unlab = _ids(tmp_path / "out" / "train_aug_unlabeled_eln-8-0.txt")
    assert unlab == ["/images/train/zurich_000999_000019.png\t"
                     "/segmentation/train/zurich_000999_000019_gtFine.png"]


def test_bad_names_and_missing_entries(tmp_path):
    with pytest.raises(DataError, match="<ratio>_labeled_<set>.txt"):
        pair_file_names("labeled.txt")
    full = tmp_path / "train_aug.txt"
    full.write_text("2007_000001\n")
    lab = tmp_path / "20_labeled_0.txt"
    lab.write_text("2007_000002\n")
    with pytest.raises(DataError, match="not in the full list"):
        write_eln_pairs([str(lab)], str(full), str(tmp_path / "o"))
