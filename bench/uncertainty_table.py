"""Does DUEB's variance know where the model is wrong? The uncertainty table on the demo.

    python bench/uncertainty_table.py [--seeds 0 1 2] [--ratio N] [--set key=value ...]

Trains full DUEB (train.py: method dueb, preset full; exp_demo settings, at the config's
labelled ratio unless --ratio; the code path of bench/demo_table.py and the experiment
scripts: furnace.engine.trainer.train, furnace.eval.cli.run) with the variance head fixed
(``dueb.aleatoric.learn_variance=false``, the reference: a random projection of trained
features) and learned (``true``), once per seed; evaluates branch 1 with ``--uncertainty``; writes
img/uncertainty_table.md (AUROC of error detection of the four scores, AUPR of the variance,
ECE, mIoU: mean ± sample std over seeds) and img/uncertainty_reliability.png, and prints the
table.

Every finished run is appended to ``--runs`` (JSON lines, default img/uncertainty_runs.jsonl)
with a fingerprint of its config; runs with the same variant, seed and fingerprint are reused,
so seeds can be added in later invocations and the table covers all requested seeds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from furnace.config import load_config  # noqa: E402
from furnace.data.demo import ensure_demo_data  # noqa: E402
from furnace.methods.presets import script_overrides  # noqa: E402
from furnace.engine.dist import DistInfo, parse_device  # noqa: E402
from furnace.engine.trainer import train  # noqa: E402
from furnace.eval.cli import run as evaluate  # noqa: E402
from furnace.eval.uncertainty import SCORES  # noqa: E402
from furnace.methods import get_method  # noqa: E402

VARIANTS = [  # (name, learn_variance, --variants key)
    ("fixed variance head (reference)", False, "fixed"),
    ("learned variance head", True, "learned"),
]
METHOD, PRESET = "dueb", "full"       # what exp_demo/train.py trains
# keys that name places or times, not what is trained; eval_every only adds validation, which
# runs under a forked RNG in eval mode and leaves the trained weights as they are
_VOLATILE = ("dir", "file", "exp_time", "dataset_path", "seed", "eval_every")


def fingerprint(C) -> str:
    """Short hash of the settings that decide a run (paths, times and the seed left out)."""
    d = {k: v for k, v in C.to_dict().items() if not any(s in k for s in _VOLATILE)}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _config(args, seed, learn, log_dir):
    ratio = [f"labeled_ratio={args.ratio}"] if args.ratio else []
    return load_config(ROOT / "exp_demo",
                       [*ratio, f"seed={seed}", f"log_dir={log_dir}", "snapshot_keep=1",
                        "tb_images_every=0", "eval_every=0",
                        f"dueb.aleatoric.learn_variance={learn}", *args.overrides],
                       env={}, preset=script_overrides(METHOD, PRESET))


def run_one(args, device, seed, learn, tmp) -> dict:
    """Train and evaluate one variant at one seed; returns the JSON row."""
    C = _config(args, seed, learn, Path(tmp) / f"{'learned' if learn else 'fixed'}_{seed}")
    t0 = time.time()
    train(C, DistInfo(device=device))
    wall = time.time() - t0
    t1 = time.time()
    res = evaluate(C, "last", [str(device)], uncertainty=True,
                   model_factory=get_method(METHOD).build_eval_model)[0]
    u = res["uncertainty"]
    rel = u["reliability"]
    return {"learn_variance": learn, "seed": seed, "fingerprint": fingerprint(C),
            "ratio": C.labeled_ratio, "overrides": args.overrides, "commit": _commit(),
            "miou": res["miou"], "pixel_acc": res["pixel_acc"], "ece": u["ece"],
            "error_rate": u["error_rate"], "pixels": u["pixels"],
            "scores": u["scores"], "train_s": wall, "eval_s": time.time() - t1,
            "reliability": {k: [None if isinstance(x, float) and math.isnan(x) else float(x)
                                for x in rel[k]] for k in ("count", "accuracy", "confidence")}}


def _mean_std(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _cell(xs, scale=1.0, digits=3):
    m, s = _mean_std([scale * x for x in xs])
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def make_table(rows, args, C0, device) -> str:
    header = (f"Demo data, 1/{C0.labeled_ratio} labels ({C0.num_train_imgs} labelled images), DUEB "
              f"(train.py), {C0.backbone} from scratch, {C0.nepochs} x {C0.niters_per_epoch} "
              f"iterations at batch {C0.batch_size}, aleatoric terms from iteration "
              f"{C0.dueb.aleatoric.start_iter}, branch 1 on the {C0.num_eval_imgs} val images, "
              f"seeds {args.seeds}, device {device}; mean ± sample std over seeds. AUROC / "
              "AUPR: error detection, wrong pixel = positive (0.5 = chance for AUROC, the "
              "error rate for AUPR); ECE: 15 bins, softmax confidence.\n\n")
    cols = ["variance", "entropy", "1-msp", "disagreement"]
    lines = ["| variance head | mIoU (%) | error rate (%) | AUROC variance | AUROC entropy "
             "| AUROC 1-msp | AUROC disagreement | AUPR variance | ECE (%) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst_err = 0.0
    for name, learn, _ in VARIANTS:
        r = [row for row in rows if row["learn_variance"] == learn]
        if not r:
            continue
        cells = [_cell([x["miou"] for x in r], 100, 2),
                 _cell([x["error_rate"] for x in r], 100, 2)]
        cells += [_cell([x["scores"][c]["auroc"] for x in r]) for c in cols]
        cells.append(_cell([x["scores"]["variance"]["aupr"] for x in r]))
        cells.append(_cell([x["ece"] for x in r], 100, 2))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        worst_err = max([worst_err] + [x["scores"][c]["auroc_err"] for x in r for c in cols])
    foot = (f"\nLargest AUROC binning error bound in these runs: {worst_err:.1e}. Train wall "
            f"time per run {min(x['train_s'] for x in rows):.0f}-"
            f"{max(x['train_s'] for x in rows):.0f} s, evaluation with both branches "
            f"{min(x['eval_s'] for x in rows):.0f}-{max(x['eval_s'] for x in rows):.0f} s.\n")
    return header + "\n".join(lines) + "\n" + foot


def plot_reliability(rows, path: Path) -> None:
    """Reliability curves of the first seed of each variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    for (name, learn, _), colour in zip(VARIANTS, ("#59c", "#c55")):
        r = sorted((row for row in rows if row["learn_variance"] == learn),
                   key=lambda x: x["seed"])
        if not r:
            continue
        rel = r[0]["reliability"]
        pts = [(c, a) for c, a in zip(rel["confidence"], rel["accuracy"]) if c is not None]
        ax.plot(*zip(*pts), "o-", color=colour, markersize=3,
                label=f"{name}, seed {r[0]['seed']} (ECE {100 * r[0]['ece']:.1f}%)")
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--ratio", type=int, default=None,
                    help="labelled ratio 1/N (default: the exp_demo config's)")
    ap.add_argument("--device", default="")
    ap.add_argument("--out", default=str(ROOT / "img" / "uncertainty_table"))
    ap.add_argument("--runs", default=str(ROOT / "img" / "uncertainty_runs.jsonl"))
    ap.add_argument("--variants", nargs="+", default=["fixed", "learned"],
                    choices=["fixed", "learned"],
                    help="train only these (e.g. one per process; a later run with both "
                         "reuses the finished runs and writes the table)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = ap.parse_args(argv)
    ensure_demo_data()
    device = parse_device(args.device)
    runs_path = Path(args.runs)
    done = []
    if runs_path.exists():
        done = [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, learn, key in VARIANTS:
                if key not in args.variants:
                    continue
                fp = fingerprint(_config(args, seed, learn, Path(tmp) / "probe"))
                old = [r for r in done if r["fingerprint"] == fp and r["seed"] == seed
                       and r["learn_variance"] == learn]
                if old:
                    row = old[-1]
                    print(f"{name} seed {seed}: reused from {runs_path.name}", flush=True)
                else:
                    row = run_one(args, device, seed, learn, tmp)
                    runs_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(runs_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                s = row["scores"]
                print(f"{name} seed {seed}: mIoU {100 * row['miou']:.2f} ECE "
                      f"{100 * row['ece']:.2f}% AUROC "
                      + " ".join(f"{c} {s[c]['auroc']:.3f}" for c in SCORES)
                      + f" train {row['train_s']:.0f}s eval {row['eval_s']:.0f}s", flush=True)
                rows.append(row)
        C0 = _config(args, args.seeds[0], False, Path(tmp) / "probe")
    table = make_table(rows, args, C0, device)
    cmd = "python bench/uncertainty_table.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"`{cmd.strip()}`\n\n" + table)
    plot_reliability(rows, out.parent / "uncertainty_reliability.png")
    print(f"wrote {out.with_suffix('.md')} and {out.parent / 'uncertainty_reliability.png'}")


if __name__ == "__main__":
    main()
