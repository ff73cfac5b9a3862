"""Method option groups (C.dueb, C.u2pl): declared beside each method, torch-free, added by
base_config and checked by validate; DUEB's old top-level names stay aliases of its keys for
config files, --set and the configs recorded in older checkpoints."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from furnace.config import (Config, ConfigError, base_config, checkpoint_config, load_config,
                            set_value)
from furnace.engine.cli import config_lines
from furnace.methods.options import OptionGroup, aliases, option_groups, register_options

VOC = ROOT / "exp_voc"
OLD_NAMES = {"unsup_weight": ("dueb", "unsup_weight"), "fuse_passes": ("dueb", "fuse_passes"),
             "supervised_only": ("dueb", "supervised_only"),
             "aleatoric": ("dueb", "aleatoric"), "energy": ("dueb", "energy")}


def test_groups_come_from_the_registry_and_config_names_no_method():
    assert {g.name for g in option_groups()} >= {"dueb", "u2pl"}
    C = base_config()
    for g in option_groups():
        assert C[g.name] == g.defaults()
    assert dict(aliases()) == OLD_NAMES
    # an old name is never also a key: it would hide the group's value
    assert not set(aliases()) & set(C.keys())
    # config.py imports no method module (and so no torch)
    code = ("import sys, furnace.config as c; c.finalize(c.base_config(), '.')\n"
            "print(' '.join(m for m in sys.modules if m.startswith('furnace.methods.')))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    modules, torch_loaded = out.stdout.splitlines()
    assert {"furnace.methods.dueb_options", "furnace.methods.u2pl_options"} <= \
        set(modules.split()) <= {"furnace.methods.options", "furnace.methods.presets",
                                 "furnace.methods.dueb_options", "furnace.methods.u2pl_options",
                                 "furnace.methods.eln_options", "furnace.methods.lpl_options"}
    assert torch_loaded == "False"
    imports = [l.strip() for l in (ROOT / "furnace" / "config.py").read_text().splitlines()
               if l.strip().startswith(("import ", "from "))]
    assert [l for l in imports if "methods" in l] == ["from .methods.options import aliases",
                                                      "from .methods.options import option_groups"]


def test_each_method_points_to_its_group():
    from furnace.methods import get_method
    assert get_method("dueb").option_group.name == "dueb"
    assert get_method("u2pl").option_group is get_method("u2pl_suponly").option_group
    assert get_method("supervised").option_group is None


def test_old_names_in_a_config_file(tmp_path):
    (tmp_path / "config.py").write_text(
        "from furnace.config import base_config\n"
        "config = C = base_config()\n"
        "C.unsup_weight = 2.0\n"
        "C.fuse_passes = True\n"
        "C.aleatoric.per_pixel = True\n"
        "C.energy = C.energy\n"
        "C.energy.sup_weight = 0.25\n")
    C = load_config(tmp_path, env={})
    assert C.dueb.unsup_weight == 2.0 and C.dueb.fuse_passes is True
    assert C.dueb.aleatoric.per_pixel is True and C.dueb.energy.sup_weight == 0.25
    # reading an old name gives the group's value, whichever way it is read
    assert C.unsup_weight == C["unsup_weight"] == C.get("unsup_weight") == 2.0
    assert C.aleatoric is C.dueb.aleatoric and "aleatoric" in C
    C.dueb.unsup_weight = 3.0
    assert C.unsup_weight == 3.0
    C.update(unsup_weight=4.0)
    assert C.dueb.unsup_weight == 4.0 and C.setdefault("unsup_weight", 9) == 4.0
    # only the new layout is stored
    d = C.to_dict()
    assert not set(OLD_NAMES) & set(d) and d["dueb"]["unsup_weight"] == 4.0


def test_old_names_in_set_and_presets():
    C = load_config(VOC, ["unsup_weight=2", "fuse_passes=true", "supervised_only=true",
                          "aleatoric.samples=3", "energy.enabled=false"], env={},
                    preset=["dueb.energy.enabled=true"])
    assert (C.dueb.unsup_weight, C.dueb.fuse_passes, C.dueb.supervised_only) == (2.0, True, True)
    assert C.dueb.aleatoric.samples == 3 and C.dueb.energy.enabled is False
    from furnace.methods.presets import method_name
    assert method_name(C) == "supervised"
    # the new names, and the last word wins whichever name it uses
    C = load_config(VOC, ["dueb.unsup_weight=2", "unsup_weight=0.5"], env={})
    assert C.dueb.unsup_weight == 0.5
    set_value(C, "dueb.aleatoric.per_pixel", "true")
    assert C.aleatoric.per_pixel is True


def test_a_bad_value_names_the_key_it_sets():
    with pytest.raises(ConfigError, match=r"^config key 'unsup_weight' expects a number, got "
                                          r"'x' \(from --set unsup_weight=x\)$"):
        load_config(VOC, ["unsup_weight=x"], env={})
    with pytest.raises(ConfigError, match=r"^config key 'dueb.unsup_weight' must be a finite "
                                          r"number >= 0, got -1\.0$"):
        load_config(VOC, ["unsup_weight=-1"], env={})
    with pytest.raises(ConfigError, match="'aleatoric' is a group; set one of its keys"):
        load_config(VOC, ["aleatoric=1"], env={})


@pytest.mark.parametrize("item, message", [
    ("unsup_weigth=2", "unknown config key 'unsup_weigth' (from --set unsup_weigth=2); did "
                       "you mean dueb.unsup_weight"),
    ("bach_size=3", "unknown config key 'bach_size' (from --set bach_size=3); did you mean "
                    "batch_size"),
    ("aleatoric.per_pixl=1", "unknown config key 'aleatoric.per_pixl' in group 'aleatoric' "
                             "(from --set aleatoric.per_pixl=1); did you mean per_pixel?"),
    ("dueb.nope=1", "unknown config key 'dueb.nope' in group 'dueb' (from --set dueb.nope=1); "
                    "known keys: aleatoric, energy, fuse_passes, supervised_only, unsup_weight"),
    # old names are top-level names only, never keys of a nested group
    ("u2pl.fuse_passes=1", "unknown config key 'u2pl.fuse_passes' in group 'u2pl'"),
    ("background=0", "unknown config key 'background'"),
])
def test_unknown_keys_still_fail(item, message):
    with pytest.raises(ConfigError) as e:
        load_config(VOC, [item], env={})
    assert str(e.value).startswith(message)


def test_unknown_attribute_still_fails():
    C = base_config()
    with pytest.raises(AttributeError, match="config has no key 'unsup_weigth'"):
        C.unsup_weigth
    assert "fuse_passes" not in C.u2pl and C.u2pl.unsup_weight == 1.0
    with pytest.raises(KeyError):
        C.u2pl["fuse_passes"]


def test_print_config_shows_the_new_layout():
    lines = config_lines(load_config(VOC, ["unsup_weight=2"], env={}))
    assert "dueb.unsup_weight = 2.0" in lines and "dueb.fuse_passes = False" in lines
    assert "dueb.aleatoric.samples = 10" in lines and "u2pl.ema_decay = 0.99" in lines
    assert not [l for l in lines if l.split(" = ")[0].split(".")[0] in OLD_NAMES]
    assert not [l for l in lines if l.startswith("background")]


def old_layout(C):
    """The config a checkpoint of the previous version recorded: DUEB's keys at the top
    level (aleatoric / energy also under dueb, the same groups then)."""
    d = C.to_dict()
    dueb = d.pop("dueb")
    d.update(unsup_weight=dueb["unsup_weight"], fuse_passes=dueb["fuse_passes"],
             supervised_only=dueb["supervised_only"], aleatoric=dueb["aleatoric"],
             energy=dueb["energy"], background=0,
             dueb={"aleatoric": dueb["aleatoric"], "energy": dueb["energy"]})
    return d


def test_old_checkpoint_config_lands_on_the_group():
    folder = load_config(VOC, env={})
    trained = load_config(VOC, ["dueb.unsup_weight=3", "dueb.fuse_passes=true",
                                "dueb.aleatoric.learn_variance=true", "dueb.energy.enabled=false",
                                "backbone=resnet18"], env={})
    recorded = old_layout(trained)
    assert "dueb" in recorded and "unsup_weight" in recorded and "unsup_weight" not in \
        recorded["dueb"]
    C = checkpoint_config(folder, recorded)
    assert (C.dueb.unsup_weight, C.dueb.fuse_passes) == (3.0, True)
    assert C.dueb.aleatoric.learn_variance is True and C.dueb.energy.enabled is False
    assert C.backbone == "resnet18" and "background" not in C
    assert C.to_dict()["dueb"] == trained.to_dict()["dueb"]
    # --set still has the last word, under either name
    assert checkpoint_config(folder, recorded, ["unsup_weight=4"]).dueb.unsup_weight == 4.0
    # the new layout round-trips as before
    assert checkpoint_config(folder, trained.to_dict()).to_dict()["dueb"] == \
        trained.to_dict()["dueb"]


class TinyDual(torch.nn.Module):
    eval_branch = 1

    def __init__(self, num_classes):
        super().__init__()
        self.branch1 = torch.nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.branch1(x)


def test_eval_of_an_old_checkpoint_uses_its_recorded_options(tmp_path):
    """eval.py's path: a checkpoint recorded with the old layout is evaluated with the
    group's keys set from it (the model factory sees the config eval.py built)."""
    from helpers import make_voc
    from furnace.engine.checkpoint import atomic_save
    from furnace.eval import cli
    root = make_voc(tmp_path / "voc", n_train=4, n_val=2, num_classes=5)
    data = [f"dataset_path={root}", f"log_dir={tmp_path / 'log'}", "num_workers=0",
            "num_classes=5", "class_names=none", "eval_mode=whole"]
    folder = load_config(VOC, data, env={})
    trained = load_config(VOC, data + ["unsup_weight=2.5", "aleatoric.learn_variance=true"],
                          env={})
    torch.manual_seed(0)
    atomic_save({"model": TinyDual(5).state_dict(), "epoch": 0, "iteration": 1,
                 "config": old_layout(trained)},
                tmp_path / "log" / "snapshot" / "epoch-0.pth")
    seen = []

    def factory(C):
        seen.append(C)
        return TinyDual(C.num_classes)

    res = cli.run(folder, "0", ["cpu"], model_factory=factory)
    assert len(res) == 1 and res[0]["hist"].sum() > 0
    assert seen and all(C.dueb.unsup_weight == 2.5 and C.dueb.aleatoric.learn_variance
                        for C in seen)


def test_a_group_of_ones_own(tmp_path):
    def check(C):
        if C.mine.weight < 0:
            raise ConfigError(f"config key 'mine.weight' must be >= 0, got {C.mine.weight}")

    group = register_options(OptionGroup("mine", lambda: Config(weight=1.0, steps=None),
                                         check, aliases={"mine_weight": "weight"},
                                         optional={"steps": int}))
    try:
        C = load_config(VOC, ["mine_weight=2", "mine.steps=none"], env={})
        assert C.mine.weight == 2.0 and C.mine.steps is None
        assert load_config(VOC, ["mine.steps=3"], env={}).mine.steps == 3
        with pytest.raises(ConfigError, match="'mine.weight' must be >= 0"):
            load_config(VOC, ["mine.weight=-1"], env={})
        with pytest.raises(ValueError, match="already an old name of group 'dueb'"):
            register_options(OptionGroup("other", Config, aliases={"unsup_weight": "x"}))
        with pytest.raises(ValueError, match="already registered"):
            register_options(OptionGroup("mine", Config))
    finally:
        from furnace.methods import options
        options._GROUPS.pop("mine")
        options._ALIASES.pop("mine_weight")
    assert "mine" not in base_config() and group.name == "mine"
