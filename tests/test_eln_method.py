"""ELN as a method: T6 (teacher/student bookkeeping) and T7 (optimiser groups) of spec
methods/ELN.md 9.2, the start-time checks, and the three stages of one iteration."""
import pytest
import torch
from torch import nn

from furnace.config import ConfigError, base_config
from furnace.methods import MethodContext
from furnace.methods.common import ema_update
from furnace.methods.eln import ELN, copy_state, eln_param_groups
from furnace.methods.eln_options import check
from furnace.methods.groups import ReferenceGroups
from furnace.models.eln import ELNDecoder, ELNSegNet, ErrorLocalizationNet


def tiny_config(**eln):
    C = base_config()
    C.update(method="eln", backbone="resnet18", pretrained_model=None, head_channels=8,
             backbone_width=8, num_classes=5, image_height=48, image_width=48, nepochs=4,
             lr=1e-3, weight_decay=1e-5)
    C.eln.update(pre_epoch=1, eln_epoch=2, window_size=8, proj_dim=4, eln_pretrained=None)
    C.eln.update(**eln)
    return C


def tiny_method(groups=1, **eln):
    return ELN(tiny_config(**eln), MethodContext(groups=ReferenceGroups(per_process=groups,
                                                                         total=groups)))


# -- T6 ---------------------------------------------------------------------------------
def test_t6_ema_and_copies():
    torch.manual_seed(0)
    t, s = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    with torch.no_grad():
        t.weight.fill_(1.0)
        s.weight.fill_(0.0)
    s.running_mean.fill_(5.0)
    t.running_mean.fill_(2.0)
    ema_update(t, s, 0.995)
    assert torch.allclose(t.weight, torch.full((2,), 0.995), atol=1e-7)
    assert torch.equal(t.running_mean, torch.full((2,), 2.0)), "BN buffers untouched"

    m = tiny_method()
    opt = m.optimizers["optimizer"]
    m.student.encoder.bn1.running_mean.fill_(3.0)
    with torch.no_grad():
        next(m.student.parameters()).add_(1.0)
    m.on_epoch_start(2, resumed=False)       # = eln_epoch: teacher <- student
    for (k, a), b in zip(m.student.state_dict().items(), m.teacher.state_dict().values()):
        assert torch.equal(a, b), k
    # the student trains a step, then the next epoch start resets it to the teacher
    p = next(m.student.parameters())
    p.grad = torch.ones_like(p)
    opt.step()
    state = {id(q): {k: v.clone() for k, v in st.items()} for q, st in opt.state.items()}
    with torch.no_grad():
        m.teacher.encoder.conv1.weight.add_(0.5)
    m.teacher.encoder.bn1.running_var.fill_(7.0)
    m.on_epoch_start(3, resumed=False)
    for (k, a), b in zip(m.student.state_dict().items(), m.teacher.state_dict().values()):
        assert torch.equal(a, b), k
    assert next(m.student.parameters()) is p, "the optimiser keeps its parameters"
    for q, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, state[id(q)][k]), "AdamW state unchanged"
    # once per epoch: a resume inside epoch 3 does not reset again
    with torch.no_grad():
        p.add_(1.0)
    m.on_epoch_start(3, resumed=True)
    assert not torch.equal(p, next(m.teacher.parameters()))
    # the reset can be switched off (plain mean teacher)
    m2 = tiny_method(student_reset=False)
    m2.on_epoch_start(2, resumed=False)
    with torch.no_grad():
        next(m2.student.parameters()).add_(1.0)
    m2.on_epoch_start(3, resumed=False)
    assert not torch.equal(next(m2.student.parameters()), next(m2.teacher.parameters()))


def test_copy_state_keeps_parameter_objects():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    w = a.weight
    copy_state(a, b)
    assert a.weight is w and torch.equal(a.weight, b.weight)


# -- T7 ---------------------------------------------------------------------------------
def test_t7_optimiser_groups_reference_sizes():
    with torch.device("meta"):
        net = ELNSegNet(21, "resnet101")
        eln = ErrorLocalizationNet(21)
        ch = net.encoder.out_channels
        auxes = [ELNDecoder(21, ch[0], ch[3]) for _ in range(2)]
    groups = eln_param_groups(net, eln, auxes, 1e-4, 0.1, train_bn_affine=False)
    assert [g["name"] for g in groups] == ["encoder", "decoder", "eln_head", "eln_backbone",
                                           "aux1", "aux2"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 1e-4, 1e-4, 1e-5, 1e-4, 1e-4])
    assert len(groups[0]["params"]) == 104
    assert len(groups[1]["params"]) == 19
    assert len(groups[2]["params"]) + len(groups[3]["params"]) == 139
    assert len(groups[4]["params"]) == len(groups[5]["params"]) == 19
    bn = {id(p) for m in [net] + auxes for mod in m.modules()
          if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()}
    chosen = {id(p) for g in groups for p in g["params"]}
    assert not bn & chosen, "no main or auxiliary BN gamma/beta"
    assert len(bn) == 256, "left out: 208 (ResNet-101) + 16 x 3 decoders"
    every = {id(p) for m in [net, eln] + auxes for p in m.parameters()}
    assert every - chosen == bn
    with_bn = eln_param_groups(net, eln, auxes, 1e-4, 0.1, train_bn_affine=True)
    assert {id(p) for g in with_bn for p in g["params"]} == every


def test_method_optimiser_is_one_adamw_with_constant_lr():
    m = tiny_method()
    opt = m.optimizers["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 6
    assert all(g["weight_decay"] == 1e-5 for g in opt.param_groups)
    sched = m.lr_schedules(1000)["optimizer"]
    assert sched.get_lr(0) == sched.get_lr(999) == 1e-3
    assert m.zero_grad_set_to_none is False and ELN.sync_batchnorm is False
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert not m.student.encoder.bn1.weight.requires_grad
    assert m.eln.backbone.bn1.weight.requires_grad


# -- start-time checks ----------------------------------------------------------------------
@pytest.mark.parametrize("eln,match", [
    (dict(pre_epoch=3, eln_epoch=3), "must be > pre_epoch"),
    (dict(pre_epoch=1, eln_epoch=4), "stage 3"),
    (dict(window_size=13), "do not fit"),
    (dict(zero_errors="skip"), "zero_errors"),
    (dict(aux_alphas=20), "aux_alphas"),
])
def test_bad_settings_are_one_line(eln, match):
    C = tiny_config(**eln)
    with pytest.raises(ConfigError, match=match) as e:
        check(C)
    assert "\n" not in str(e.value)


def test_good_settings_pass_validation():
    C = tiny_config()
    check(C)


# -- one iteration per stage ----------------------------------------------------------------
def batches(n=4, size=48, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = {"data": torch.randn(n, 3, size, size, generator=g),
           "label": torch.randint(0, C, (n, size, size), generator=g)}
    lab["label"][:, :4] = 255
    x = torch.randn(n, 3, size, size, generator=g)
    unl = {"data": x, "strong": x + 0.1 * torch.randn(x.shape, generator=g)}
    return [lab, unl]


def run_step(m, epoch, it=0):
    m.train_mode()
    m.on_epoch_start(epoch, resumed=False)
    opt = m.optimizers["optimizer"]
    opt.zero_grad(set_to_none=m.zero_grad_set_to_none)
    loss, terms, extras = m.train_step(batches(), iteration=it, epoch=epoch,
                                       backward=lambda l: l.backward())
    opt.step()
    m.after_step(iteration=it, epoch=epoch)
    return loss, terms


def test_stages_have_their_terms():
    torch.manual_seed(0)
    m = tiny_method(groups=2, empty_pseudo="zero")
    _, t1 = run_step(m, 0)
    assert set(t1) == {"loss_sup", "loss"}
    assert all(p.grad is None for p in m.eln.parameters()), "stage 1: the ELN gets nothing"
    _, t2 = run_step(m, 1)
    assert {"loss_aux", "loss_eln", "gate1", "gate2"} <= set(t2)
    assert all(p.grad is not None for p in m.eln.parameters())
    assert all(p.grad is None for p in m.student.decoder.proj.parameters())
    _, t3 = run_step(m, 2)
    assert {"loss_pl_s", "loss_pl_w", "loss_con_s", "loss_con_w", "kept"} <= set(t3)
    assert all(torch.isfinite(v) for v in t3.values())
    assert any(p.grad is not None for p in m.student.decoder.proj.parameters())
    assert set(m.eval_models()) == {"model", "teacher"}
    assert m.train_step(batches(), iteration=1, epoch=2, backward=lambda l: None)[2][
        "logits"].shape == (4, 5, 48, 48), "both groups' logits"
    total = t3["loss_sup"] + t3["loss_aux"] + t3["loss_eln"] + t3["loss_pl_s"] + \
        t3["loss_pl_w"] + t3["loss_con_s"] + t3["loss_con_w"]
    assert torch.allclose(total, t3["loss"], atol=1e-5)


# -- weights and the ELN target options ------------------------------------------------------
def test_eln_backbone_loads_torchvision_layout_like_the_reference(tmp_path):
    from furnace.models.resnet import resnet34
    torch.manual_seed(0)
    src = resnet34(stem="classic", width=8)          # torchvision keys, 3-channel stem
    state = {k: v for k, v in src.state_dict().items()
             if not k.endswith("num_batches_tracked")}   # as the V1 torchvision file
    state["fc.weight"] = torch.zeros(10, 64)
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    eln = ErrorLocalizationNet(5, width=8, inner=8, pretrained=path)
    own = eln.backbone.state_dict()
    assert len(own) == 216
    shortcut = [k for k in own if ".0.downsample." in k]
    loaded = [k for k in state if k in own and k != "conv1.weight" and k not in shortcut]
    assert len(loaded) == 164
    assert all(torch.equal(own[k], state[k]) for k in loaded)
    assert eln.backbone.conv1.weight.shape[1] == 3 + 1 + 5
    assert not torch.equal(own["layer2.0.downsample.0.weight"],
                           state["layer2.0.downsample.0.weight"]), "shortcuts stay random"
    fixed = ErrorLocalizationNet(5, width=8, inner=8, pretrained=path, load_shortcuts=True)
    assert torch.equal(fixed.backbone.state_dict()["layer2.0.downsample.0.weight"],
                       state["layer2.0.downsample.0.weight"])
    with pytest.raises(FileNotFoundError, match="ELN backbone weights not found"):
        ErrorLocalizationNet(5, width=8, inner=8, pretrained=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="pretrained backbone weights not found"):
        ELNSegNet(5, "resnet18", width=8, inner=8, pretrained=tmp_path / "missing.pth")


def test_ignore_pixels_can_be_left_out_of_the_eln_target():
    from furnace.losses.eln import eln_loss
    label = torch.tensor([[[0, 1], [255, 1]]])
    pred = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [2.0, 0.0]]]])  # 0 1 / 1 0
    z = torch.tensor([[[[1.0, -1.0], [0.5, 2.0]]]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # faithful: the ignore pixel is an error; T = [1, 1; 0, 0], n1 = 2, n0 = 2
    t = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    ref = bce(z[0, 0], t, reduction="none").mean()
    assert torch.allclose(eln_loss(z, pred, label), ref, atol=1e-7)
    # left out: three pixels, T = [1, 1, 0], w0 = 2
    l = bce(z[0, 0], t, reduction="none")
    ref2 = (l[0, 0] + l[0, 1] + 2 * l[1, 1]) / 3
    assert torch.allclose(eln_loss(z, pred, label, ignore_as_error=False), ref2, atol=1e-7)


def test_one_stage3_step_under_bf16_autocast():
    torch.manual_seed(0)
    C = tiny_config(empty_pseudo="zero")
    m = ELN(C, MethodContext(amp=torch.bfloat16))
    m.on_epoch_start(2, resumed=False)
    m.train_mode()
    loss, terms, extras = m.train_step(batches(), iteration=0, epoch=2,
                                       backward=lambda l: l.backward())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in terms.values())
    assert extras["logits"].shape == (4, 5, 48, 48)


def test_eval_key_follows_the_option_and_the_stage():
    m = tiny_method()
    m.epoch = 3
    assert m.extra_state()["eval_key"] == "model"
    m2 = tiny_method(eval_network="teacher")
    m2.epoch = 1
    assert m2.extra_state()["eval_key"] == "model", "no teacher before stage 3"
    m2.epoch = 2
    assert m2.extra_state()["eval_key"] == "teacher"
    assert ELN.eval_weights_key({"extra": {"eval_key": "teacher"}}) == "teacher"
    assert ELN.eval_weights_key({}) == "model"


def test_validation_cadence_of_the_reference():
    m = tiny_method(pre_epoch=20, eln_epoch=70)
    due = []
    for e in range(75):
        m.epoch = e
        due.append(bool(m.eval_models()))
    assert [e for e, d in enumerate(due) if d] == [0, 10, 30, 60, 70, 71, 72, 73, 74]
    m.epoch = 71
    assert set(m.eval_models()) == {"model", "teacher"}
    m.epoch = 5
    assert m.eval_models() == {}
    m2 = tiny_method(pre_epoch=20, eln_epoch=70, val_cadence="all")
    m2.epoch = 5
    assert set(m2.eval_models()) == {"model"}



def test_gates_in_the_method_and_the_soft_gate_of_zero_grad():
    torch.manual_seed(0)
    m = tiny_method(aux_alphas=[0.0, 1e9])       # decoder 1 always in, decoder 2 never
    _, t = run_step(m, 1)
    assert t["gate1"].item() == 1.0 and t["gate2"].item() == 0.0
    assert all(p.grad is not None for p in m.auxes[0].cls.parameters())
    assert all(p.grad is None for p in m.auxes[1].parameters())
    assert all(p.grad is None for p in m.auxes[0].proj.parameters()), "proj never used"
    # the gate closes: with torch 1.11's zero_grad (set_to_none=False, the default) AdamW
    # still moves decoder 1 (zero gradient, non-zero moments); with set_to_none it does not
    for to_none, moves in ((False, True), (True, False)):
        m.o.aux_alphas = [1e9, 1e9]
        m.alphas = [1e9, 1e9]
        m.zero_grad_set_to_none = to_none
        before = m.auxes[0].cls[0].weight.detach().clone()
        run_step(m, 1)
        changed = not torch.equal(before, m.auxes[0].cls[0].weight)
        assert changed == moves, to_none
