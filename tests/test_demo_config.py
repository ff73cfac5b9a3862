"""The demo experiment: its config loads and asks for its data to be generated when missing."""
import furnace.data.demo as demo
from conftest import ROOT
from furnace.config import load_config


def test_demo_config_and_data_hook(tmp_path, monkeypatch):
    C = load_config(ROOT / "exp_demo", [f"dataset_path={tmp_path / 'demo'}"], env={})
    assert C.num_classes == len(demo.DEMO_CLASSES) == len(C.class_names)
    assert C.backbone == "resnet18" and C.pretrained_model is None and C.labeled_ratio == 80
    assert C.train_source.endswith("train_aug_labeled_1-80.txt")
    assert C.labeled_ratio in demo.DEMO_RATIOS and (C.head_channels, C.backbone_width) == (32, 16)
    assert C.niters_per_epoch * C.nepochs == 1000 and C.batch_size == 8
    calls = []
    monkeypatch.setattr(demo, "ensure_demo_data", lambda root: calls.append(root))
    demo.prepare_from_config(C)
    assert calls == [str(tmp_path / "demo")]
    C.generate_demo_data = False
    demo.prepare_from_config(C)
    assert len(calls) == 1
