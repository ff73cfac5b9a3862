"""Poly LR schedule against the reference values (tests/golden/lr_poly.json)."""
import json

import torch

from furnace.engine.lr import PolyLR, set_lr


def test_poly_matches_reference(golden_dir):
    cases = json.loads((golden_dir / "lr_poly.json").read_text())["cases"]
    for case in cases:
        policy = PolyLR(case["start_lr"], case["lr_power"], case["total_iters"],
                        case["warmup_steps"])
        for t, want in case["lr"].items():
            got = policy.get_lr(int(t))
            assert abs(got - want) <= 1e-15 * max(abs(want), 1e-300), (case, t, got, want)


def test_set_lr_writes_every_group():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    o1 = torch.optim.SGD([{"params": [a.weight]}, {"params": [a.bias], "weight_decay": 0}], lr=1)
    o2 = torch.optim.SGD(b.parameters(), lr=1)
    set_lr((o1, o2), 0.125)
    assert [g["lr"] for o in (o1, o2) for g in o.param_groups] == [0.125] * 3
