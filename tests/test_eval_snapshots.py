"""Every -e form of eval.py (REFERENCE 5.2, QUIRK 30 fixed)."""
import os

import pytest

from furnace.eval.snapshots import available_epochs, checkpoint_epoch, resolve_checkpoints


@pytest.fixture()
def snap(tmp_path):
    d = tmp_path / "snapshot"
    d.mkdir()
    # created out of order so that listdir order is not epoch order
    for n in (12, 8, 30, 10, 9):
        (d / f"epoch-{n}.pth").write_bytes(b"x")
    (d / "epoch-last.pth").write_bytes(b"x")
    for foreign in ("notes.txt", "epoch-x.pth", "epoch-3.pth.tmp", ".epoch-5.pth.tmp1",
                    "best.pth"):
        (d / foreign).write_bytes(b"x")
    (d / "epoch-7.pth").mkdir()          # a folder with a checkpoint name is not a checkpoint
    return d


def names(paths):
    return [p.name for p in paths]


def test_single_epoch_and_last(snap):
    assert resolve_checkpoints("10", snap) == [snap / "epoch-10.pth"]
    assert resolve_checkpoints("last", snap) == [snap / "epoch-last.pth"]


def test_closed_range_in_epoch_order(snap):
    assert names(resolve_checkpoints("8-12", snap)) == [
        "epoch-8.pth", "epoch-9.pth", "epoch-10.pth", "epoch-12.pth"]
    assert names(resolve_checkpoints("9-11", snap)) == ["epoch-9.pth", "epoch-10.pth"]


def test_degenerate_range_a_a(snap):
    assert names(resolve_checkpoints("10-10", snap)) == ["epoch-10.pth"]


def test_open_range(snap):
    assert names(resolve_checkpoints("10-", snap)) == ["epoch-10.pth", "epoch-12.pth",
                                                       "epoch-30.pth"]
    assert names(resolve_checkpoints("0-", snap))[0] == "epoch-8.pth"


def test_pth_path_relative_and_absolute(snap, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere" / "my.pth"
    other.parent.mkdir()
    other.write_bytes(b"x")
    assert resolve_checkpoints(str(other), snap) == [other]
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoints("elsewhere/my.pth", snap) == [other]
    # a .pth name is a path, not looked up in the snapshot folder
    with pytest.raises(FileNotFoundError, match="epoch-10.pth"):
        resolve_checkpoints("epoch-10.pth", snap)


def test_missing_epoch_names_path_and_lists_available(snap):
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoints("11", snap)
    msg = str(e.value)
    assert str(snap / "epoch-11.pth") in msg
    assert "8, 9, 10, 12, 30" in msg and "last" in msg


def test_missing_last_and_missing_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="epoch-last.pth"):
        resolve_checkpoints("last", empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoints("3-5", tmp_path / "nope")


def test_empty_range(snap):
    with pytest.raises(FileNotFoundError, match=r"13-29.*8, 9, 10, 12, 30"):
        resolve_checkpoints("13-29", snap)
    with pytest.raises(FileNotFoundError, match="31-"):
        resolve_checkpoints("31-", snap)


@pytest.mark.parametrize("spec", ["abc", "3-x", "-5", "1-2-3", "x.pt", "", "3,4", "last-"])
def test_bad_specs(snap, spec):
    with pytest.raises(ValueError):
        resolve_checkpoints(spec, snap)


def test_backwards_range(snap):
    with pytest.raises(ValueError, match="12-8"):
        resolve_checkpoints("12-8", snap)


def test_helpers(snap):
    assert available_epochs(snap) == [8, 9, 10, 12, 30]
    assert checkpoint_epoch("a/epoch-12.pth") == 12
    assert checkpoint_epoch("epoch-last.pth") is None
    assert available_epochs(os.path.join(str(snap), "missing")) == []
