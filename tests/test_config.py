"""Config: reference values, env and --set overrides, derived values, clear errors."""
import pytest

from conftest import ROOT
from furnace.config import ConfigError, data_root, load_config

VOC = ROOT / "exp_voc"
CITY = ROOT / "exp_city"


def test_reference_values_voc():
    C = load_config(VOC, env={})
    assert (C.num_classes, C.labeled_ratio, C.nepochs, C.batch_size, C.lr) == (21, 4, 40, 8, 0.005)
    assert C.train_source == "subset_train_aug/train_aug_labeled_1-4.txt"
    assert C.unsup_source == "subset_train_aug/train_aug_unlabeled_1-4.txt"
    assert (C.num_train_imgs, C.num_unsup_imgs, C.max_samples) == (2645, 7937, 7937)
    assert C.niters_per_epoch == 992
    assert C.nepochs * C.niters_per_epoch == 39680
    assert C.snapshot_from == 40 // 6
    assert C.dataset_path == str(ROOT / "DATA" / "pascal_voc")


def test_reference_values_city():
    C = load_config(CITY, env={})
    assert (C.num_classes, C.labeled_ratio, C.nepochs, C.batch_size, C.lr) == (19, 16, 150, 6, 0.01)
    assert (C.num_train_imgs, C.num_unsup_imgs) == (185, 2790)
    assert C.niters_per_epoch == 465 and C.ohem_min_kept == 300000
    assert C.train_source == "config_new/subset_train/train_aug_labeled_1-16.txt"
    assert C.unsup_weight == 5 and C.sup_loss == "ohem"


def test_set_recomputes_derived_values():
    C = load_config(VOC, ["labeled_ratio=8"], env={})
    assert C.train_source.endswith("train_aug_labeled_1-8.txt")
    assert C.unsup_source.endswith("train_aug_unlabeled_1-8.txt")
    assert C.num_train_imgs == 10582 // 8
    assert C.niters_per_epoch == (10582 - 10582 // 8) // 8 == 1157
    C = load_config(CITY, ["batch_size=16"], env={})
    assert C.ohem_min_kept == 50000 * 16 and C.niters_per_epoch == 2790 // 16


def test_explicit_value_is_not_rederived():
    C = load_config(VOC, ["niters_per_epoch=7", "labeled_ratio=2"], env={})
    assert C.niters_per_epoch == 7
    C = load_config(VOC, ["train_source=my/list.txt"], env={})
    assert C.train_source == "my/list.txt"


def test_env_overrides_and_debug_zero_is_off(tmp_path):
    env = {"learning_rate": "0.02", "batch_size": "4", "snapshot_iter": "3", "debug": "0",
           "snapshot_dir": str(tmp_path)}
    C = load_config(VOC, env=env)
    assert C.lr == 0.02 and C.batch_size == 4 and C.snapshot_iter == 3
    assert C.debug == 0
    assert C.niters_per_epoch == 7937 // 4
    assert C.snapshot_dir == str(tmp_path / "snapshot")
    assert load_config(VOC, env={"debug": "1"}).debug == 10


def test_volna_root(tmp_path):
    (tmp_path / "DATA").mkdir()
    assert data_root("city", env={"volna": str(tmp_path)}) == str(tmp_path / "DATA" / "city")
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert data_root("city", env={"volna": str(other)}) == str(other / "city")


def test_nested_voc_folder_is_found(tmp_path):
    inner = tmp_path / "pascal_voc" / "pascal_voc"
    inner.mkdir(parents=True)
    (inner / "val.txt").write_text("a\n")
    C = load_config(VOC, [f"dataset_path={tmp_path / 'pascal_voc'}"], env={})
    assert C.dataset_path == str(inner)


def test_nested_and_typed_values():
    C = load_config(VOC, ["aleatoric.per_pixel=true", "eval_branch=mean", "eval_flip=yes",
                          "train_scale_array=0.5,1.0", "pretrained_model=none",
                          "backbone=resnet18", "output_stride=8"], env={})
    assert C.aleatoric.per_pixel is True and C.eval_branch == "mean" and C.eval_flip is True
    assert C.train_scale_array == [0.5, 1.0] and C.pretrained_model is None
    assert C.backbone == "resnet18" and C.output_stride == 8


@pytest.mark.parametrize("item, words", [
    ("bach_size=3", ["unknown config key 'bach_size'", "batch_size"]),
    ("batch_size=x", ["'batch_size' expects an integer", "'x'"]),
    ("eval_flip=maybe", ["'eval_flip' expects a boolean"]),
    ("backbone=vgg16", ["'backbone' expects one of", "resnet50"]),
    ("aleatoric.per_pixl=1", ["unknown config key 'aleatoric.per_pixl'", "per_pixel"]),
    ("aleatoric=1", ["'aleatoric' is a group"]),
    ("lr", ["expects key=value"]),
])
def test_bad_overrides_are_clear(item, words):
    with pytest.raises(ConfigError) as e:
        load_config(VOC, [item], env={})
    for w in words:
        assert w in str(e.value)


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="env batch_size"):
        load_config(VOC, env={"batch_size": "eight"})


def test_missing_experiment_config(tmp_path):
    with pytest.raises(ConfigError, match="no experiment config"):
        load_config(tmp_path, env={})


def test_preset_then_set_wins():
    C = load_config(VOC, ["energy.enabled=true"], env={}, preset=["energy.enabled=false"])
    assert C.energy.enabled is True


def test_checkpoint_config_takes_network_and_protocol_from_the_file():
    from furnace.config import checkpoint_config
    folder = load_config(VOC, env={})
    trained = load_config(VOC, ["backbone=resnet18", "head_channels=16", "num_classes=5",
                                "backbone_width=8",
                                "u2pl.rep_dim=8", "eval_mode=whole", "eval_flip=true",
                                "dataset_path=/elsewhere", "aleatoric.learn_variance=true",
                                "lr=0.5"], env={})
    recorded = trained.to_dict()
    recorded["a_key_of_another_version"] = 1
    C = checkpoint_config(folder, recorded)
    assert (C.backbone, C.head_channels, C.num_classes, C.u2pl.rep_dim) == ("resnet18", 16, 5, 8)
    assert C.backbone_width == 8
    assert C.aleatoric.learn_variance and C.dueb.aleatoric.learn_variance
    assert (C.eval_mode, C.eval_flip) == ("whole", True)
    # data and training keys stay the folder's; the folder's config is not modified
    assert C.dataset_path == folder.dataset_path and C.lr == folder.lr
    assert (folder.backbone, folder.eval_mode) == ("resnet50", "slide")
    own = checkpoint_config(folder, recorded, protocol=False)
    assert own.backbone == "resnet18" and (own.eval_mode, own.eval_flip) == ("slide", False)
    # --set has the last word
    assert checkpoint_config(folder, recorded, ["eval_mode=slide"]).eval_mode == "slide"
    assert checkpoint_config(folder, None) is folder, "reference files record no config"
    recorded["eval_crop_size"] = -3
    with pytest.raises(ConfigError, match=r"^x.pth: config key 'eval_crop_size'"):
        checkpoint_config(folder, recorded, source="x.pth")
