"""How close the float64 golden forward comes to its tolerances, per CPU kernel set.

    python bench/golden_margin.py            # runs itself under each kernel set below

float64 convolutions run on im2col + BLAS, whose kernels differ between instruction sets; the
golden tolerances (tests/test_models.py, golden/README.md section 2) must hold on any x86-64
CPU. This machine can emulate older CPUs: ATen's ATEN_CPU_CAPABILITY (default, avx2, avx512)
and MKL's MKL_ENABLE_INSTRUCTIONS (SSE4_2, AVX2, AVX512) choose the kernels. For each setting it
prints the worst error of each check as a fraction of its tolerance (1.0 = at the limit).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("default", "SSE4_2"), ("avx2", "AVX2"), ("avx512", "AVX512"), ("avx2", "SSE4_2"),
            ("default", "AVX512")]


def measure() -> dict:
    """Worst error / tolerance of every golden forward check in this process."""
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from test_models import PROBE_ATOL_OF_MAX, PROBE_RTOL, _meta_network, deterministic_fill

    data = np.load(ROOT / "tests" / "golden" / "network_r50_c21.npz")
    model = _meta_network(21, "resnet50").double().to_empty(device="cpu")
    fill = deterministic_fill(model.state_dict())
    x = torch.from_numpy(data["x"])
    worst = {}

    def probe(name, got, want, scale, idx=None):
        got = got.reshape(-1)[idx] if idx is not None else got.reshape(-1)
        tol = PROBE_RTOL * np.abs(want) + PROBE_ATOL_OF_MAX * scale
        worst[name] = float((np.abs(got - want) / tol).max())
        worst[name + " (atol 1e-12)"] = float(
            (np.abs(got - want) / (PROBE_RTOL * np.abs(want) + 1e-12)).max())

    for mode in ("eval", 1, 2):
        model.load_state_dict(fill, strict=True)
        with torch.no_grad():
            if mode == "eval":
                model.eval()
                maps = {"eval_logits": model(x)}
            else:
                model.train()
                _, logits, var = model(x, step=mode)
                maps = {f"train_step{mode}_logits": logits, f"train_step{mode}_var": var}
        for name, t in maps.items():
            idx = data["probe_idx_var" if name.endswith("var") else "probe_idx_logits"]
            probe(name, t.numpy(), data[name + "__probe_f64"], np.abs(data[name]).max(), idx)
        if mode != "eval":
            state = model.state_dict()
            pre = f"train_step{mode}_after__"
            for name in data.files:
                if name.startswith(pre) and "num_batches" not in name:
                    want = data[name]
                    probe(f"step{mode} BN buffers", state[name[len(pre):]].numpy(), want,
                          np.abs(want).max())
    return worst


def main() -> None:
    if os.environ.get("_GOLDEN_MARGIN_CHILD"):
        print(json.dumps(measure()))
        return
    rows = {}
    for aten, mkl in SETTINGS:
        env = dict(os.environ, _GOLDEN_MARGIN_CHILD="1", ATEN_CPU_CAPABILITY=aten,
                   MKL_ENABLE_INSTRUCTIONS=mkl, OMP_NUM_THREADS="2")
        out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
        if out.returncode:
            print(f"{aten}/{mkl}: failed\n{out.stderr[-2000:]}")
            continue
        rows[f"{aten}/{mkl}"] = json.loads(out.stdout.strip().splitlines()[-1])
    names = list(next(iter(rows.values())))
    print("worst |error| / tolerance of the float64 golden forward checks (1.0 = at the limit)")
    print("check".ljust(36) + "".join(k.rjust(16) for k in rows))
    for n in names:
        print(n.ljust(36) + "".join(f"{rows[k][n]:16.3g}" for k in rows))


if __name__ == "__main__":
    main()
