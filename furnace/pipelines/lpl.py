"""LPL's whole pipeline, as the reference's ``run.py`` runs it (spec methods/LPL.md 4), for one
or several pixel-labelled subsets:

1. ``stage1``: HybridNet and PseudoNet (method ``lpl``);
2. ``test1``: HybridNet on the val list with the val images' image-level labels (the
   reference's oracle protocol, recorded in the checkpoint's config);
3. ``export``: HybridNet's multi-scale, class-restricted pseudo labels of every training image
   and the list of GT (pixel-labelled ids) and pseudo labels (the rest);
4. ``retrain``: a fresh network on that list (method ``lpl_retrain``);
5. ``retest``: the retrained network on the val list, without image-level labels (DenseCRF
   when the preset asks for it).

Each subset has its folder ``<exp>/log/lpl-<preset>/<subset>/`` with one folder per stage and
``pipeline.json``, the record of the finished stages and their results. A stopped pipeline
run again resumes in the stage it stopped in: a training from its ``epoch-last.pth``, the
export from the pseudo labels already written; finished stages are not run again. Every stage
also runs alone (``--stages``). Under torchrun the trainings are distributed; the tests and
the export run on rank 0 while the others wait.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError, add_config_arguments, load_config

STAGES = ("stage1", "test1", "export", "retrain", "retest")


def subset_name(list_path: str) -> str:
    """The folder of a labelled list: its file name without the extension."""
    return Path(list_path).stem


class PipelineState:
    """``pipeline.json`` of one subset: stage -> its result (a dict), written atomically."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "pipeline.json"
        self.done: Dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.done = json.loads(self.path.read_text())["done"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{self.path} is not a pipeline record ({e}); delete it to "
                                  "run every stage again") from None

    def finish(self, stage: str, result: dict) -> None:
        self.done[stage] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"done": self.done}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def _barrier(info) -> None:
    if info.distributed:
        import torch.distributed as dist
        dist.barrier()


def _train(exp_dir: str, method: str, preset: str, overrides: List[str], info) -> Path:
    """Train (or resume) one stage; returns its final checkpoint."""
    from ..engine.trainer import train
    C = load_config(exp_dir, overrides, preset=_preset_lines(method, preset))
    last = Path(C.snapshot_dir) / "epoch-last.pth"
    resume = str(last) if last.is_file() else None
    if resume is not None:
        from ..engine.checkpoint import load_file
        ck = load_file(resume)
        if int(ck.get("epoch", -1)) >= C.nepochs - 1 and \
                int(ck.get("iteration", -1)) >= int(C.niters_per_epoch) - 1:
            return last        # finished before the record was written
    train(C, info, resume)
    return last


def _evaluate(exp_dir: str, ckpt: Path, overrides: List[str], devices: Sequence[str]) -> dict:
    """The mIoU of one checkpoint with the network, data and protocol it recorded (the
    stage's config: ``overrides``)."""
    from ..eval.cli import run
    C = load_config(exp_dir, overrides)
    (r,) = run(C, epochs=str(ckpt), devices=list(devices))
    return {"checkpoint": str(ckpt), "miou": r["miou"], "pixel_acc": r["pixel_acc"],
            "iou": r["iou"]}


def run_subset(exp_dir: str, preset: str, labeled: Optional[str], overrides: Sequence[str],
               info, stages: Sequence[str] = STAGES, eval_devices: Sequence[str] = ("cpu",),
               out: Optional[str] = None) -> Tuple[str, Dict[str, dict]]:
    """Run the ``stages`` of one labelled subset ``labeled`` (a list relative to
    dataset_path; None: the preset's train_source). Returns the subset's name and record."""
    overrides = list(overrides)
    pre1 = [f"train_source={labeled}"] if labeled else []
    probe = load_config(exp_dir, pre1 + overrides,
                        preset=_preset_lines("lpl", preset))
    labeled = labeled or probe.train_source
    folder = Path(out or Path(exp_dir) / "log" / f"lpl-{preset}") / subset_name(labeled)
    state = PipelineState(folder)
    s1 = pre1 + overrides + [f"log_dir={folder / 'stage1'}"]
    s2_list = folder / "pseudo_list.txt"
    s2 = overrides + [f"log_dir={folder / 'retrain'}", f"train_source={s2_list}"]
    for stage in STAGES:
        if stage not in stages or stage in state.done:
            continue
        if info.is_main:
            print(f"# lpl pipeline: {subset_name(labeled)}: {stage}", flush=True)
        if stage == "stage1":
            ck = _train(exp_dir, "lpl", preset, s1, info)
            result = {"checkpoint": str(ck)}
        elif stage == "retrain":
            if not s2_list.is_file():
                raise ConfigError(f"stage 'retrain' reads {s2_list}, which the 'export' stage "
                                  "writes; run that stage first (--stages export retrain)")
            ck = _train(exp_dir, "lpl_retrain", preset, s2, info)
            result = {"checkpoint": str(ck)}
        elif stage == "export":
            result = _export(folder, labeled, eval_devices, probe, info)
        else:
            result = {}
            if info.is_main:
                result = _test(stage, exp_dir, preset, folder, s1, s2, eval_devices)
            _barrier(info)
        if info.is_main:
            state.finish(stage, result)
        _barrier(info)
        state.done[stage] = result
    return subset_name(labeled), state.done


def _preset_lines(method: str, preset: str) -> List[str]:
    from ..methods.presets import script_overrides
    return script_overrides(method, preset)


def _test(stage, exp_dir, preset, folder, s1, s2, devices) -> dict:
    """The two tests (rank 0), each with the protocol its checkpoint recorded."""
    if stage == "test1":
        ck = _need(folder / "stage1" / "snapshot" / "epoch-last.pth", stage, "stage1")
        return _evaluate(exp_dir, ck, _preset_lines("lpl", preset) + s1, devices)
    ck = _need(folder / "retrain" / "snapshot" / "epoch-last.pth", stage, "retrain")
    return _evaluate(exp_dir, ck, _preset_lines("lpl_retrain", preset) + s2, devices)


def _export(folder, labeled, devices, probe, info) -> dict:
    """HybridNet's pseudo labels of every training image (each process a share of them),
    then rank 0 checks them all and writes the list: GT for the ids of ``labeled``."""
    from ..eval.export import export_pseudo_labels
    ck = _need(folder / "stage1" / "snapshot" / "epoch-last.pth", "export", "stage1")
    listed = folder / "pseudo_list.txt"
    args = (probe, ck, probe.unsup_source, folder / "pseudo")
    kw = dict(devices=tuple(devices), keep_labelled=labeled, list_out=listed)
    if info.distributed:
        export_pseudo_labels(*args, part=(info.rank, info.world_size), **kw)
        _barrier(info)
    if info.is_main:
        export_pseudo_labels(*args, **kw)
    return {"list": str(listed)}


def _need(path: Path, stage: str, before: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"stage '{stage}' reads {path}, which the '{before}' stage writes; "
                          f"run that stage first")
    return path


def format_table(records: Dict[str, Dict[str, dict]]) -> str:
    """The pipeline's results as printed: one row per subset."""
    rows = ["| subset | stage 1 HybridNet (with image-level labels) | retrained |",
            "|---|---|---|"]
    for name, done in records.items():
        cells = [f"{100 * done[s]['miou']:.2f}" if "miou" in done.get(s, {}) else "-"
                 for s in ("test1", "retest")]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def main(exp_dir: str, preset: str, argv: Optional[Sequence[str]] = None) -> int:
    """The command line of ``lplpipeline.py`` (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labeled", nargs="+", default=None,
                   help="pixel-labelled lists, relative to dataset_path (default: the "
                        "preset's train_source)")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="shorthand for --labeled splits_lpl/lpl_labeled_<N>.txt ...")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="run only these stages (in pipeline order)")
    p.add_argument("-d", "--devices", default="",
                   help="training device (one per process; torchrun for several); the "
                        "tests and the export run there too")
    p.add_argument("--out", default=None, help="folder of the runs (default log/lpl-<preset>)")
    add_config_arguments(p)
    args = p.parse_args(argv)
    lists = list(args.labeled or [])
    lists += [f"splits_lpl/lpl_labeled_{n}.txt" for n in (args.sizes or [])]
    from ..engine.dist import cleanup, setup
    try:
        info = setup(args.devices)
        devices = [str(info.device)]
        records = {}
        for labeled in lists or [None]:
            name, done = run_subset(exp_dir, preset, labeled, args.overrides, info,
                                    args.stages, devices, args.out)
            records[name] = done
        if info.is_main:
            print(format_table(records), flush=True)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        trainer = sys.modules.get("furnace.engine.trainer")
        if trainer is None or not isinstance(e, trainer.TrainingInterrupted):
            raise
        # a preemption signal: the training saved its checkpoint; this command resumes it
        print(f"interrupted by {e.signame}; saved {e.path}; run the same command again to "
              "resume the pipeline in this stage", file=sys.stderr)
        return 128 + e.signum
    finally:
        cleanup()
    return 0
