"""Checkpoint I/O: atomic writes survive a kill, keep-last-K, tolerant and strict reads."""
import os

import pytest
import torch

from helpers import kill_while_saving
from furnace.engine import checkpoint as ck


def test_save_writes_epoch_and_last_and_keeps_k(tmp_path):
    for e in range(5):
        ck.save_checkpoint(tmp_path, e, {"epoch": e, "model": {}}, keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["epoch-3.pth", "epoch-4.pth", "epoch-last.pth"]
    assert ck.load_file(tmp_path / "epoch-last.pth")["epoch"] == 4


def assert_writing(folder):
    assert any(n.startswith(".epoch-2.pth.tmp") for n in os.listdir(folder))


def test_killed_while_saving_leaves_last_loadable(tmp_path):
    # A child saves epoch 1, then starts saving epoch 2 with an object whose pickling stalls;
    # we SIGKILL it mid-write. epoch-last.pth must still be the complete epoch-1 file.
    kill_while_saving(f"""
        save_checkpoint({str(tmp_path)!r}, 1, {{"epoch": 1, "w": torch.ones(1000)}})
        save_checkpoint({str(tmp_path)!r}, 2, {{"epoch": 2, "w": torch.ones(10**6), "s": Slow()}})
    """, during=lambda: assert_writing(tmp_path))
    last = ck.load_file(tmp_path / "epoch-last.pth")
    assert last["epoch"] == 1 and torch.equal(last["w"], torch.ones(1000))
    assert not (tmp_path / "epoch-2.pth").exists()


def test_model_state_unwraps_and_strips_module():
    sd = {"module.branch1.classifier.weight": torch.zeros(3, 4, 1, 1)}
    assert list(ck.model_state({"model": sd})) == ["branch1.classifier.weight"]
    assert list(ck.model_state(sd)) == ["branch1.classifier.weight"]


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="epoch-9.pth"):
        ck.load_file(tmp_path / "epoch-9.pth")
    bad = tmp_path / "epoch-1.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match="epoch-1.pth"):
        ck.load_file(bad)
