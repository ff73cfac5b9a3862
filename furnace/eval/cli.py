"""Command line of the experiment ``eval.py`` scripts (REFERENCE 1.7, 5).

    python eval.py [-e last|N|a-b|a-|file.pth] [-d cpu|0|0,1|0-3] [-v] [-s] [-p PATH]
                   [--uncertainty] [--protocol checkpoint|folder] [--set key=value ...]

For every selected checkpoint: build the network the checkpoint's run recorded (any method;
its validation protocol too unless ``--protocol folder``), load the weights, evaluate the
``eval_source`` list (images split over the devices, one process per device), print
``Model: <path>`` and the result table, append both to ``val_log_file`` and point
``link_val_log_file`` (log/val_last.log) at it. ``-s`` saves composites (input | prediction |
ground truth | variance | errors) under ``-p`` (default ``<log_dir>/pred_imgs/<checkpoint
stem>/``). ``--uncertainty`` adds the error-detection and calibration table
(furnace/eval/uncertainty.py) to the output and the log, and writes the reliability diagram
to ``<log_dir>/reliability/<checkpoint stem>.png``.
Errors a user can fix are printed as one line (exit code 2).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from furnace.config import ConfigError, checkpoint_config, load_config

# The rest of the evaluation stack (torch, OpenCV) is imported where it is used, so that
# ``eval.py --help`` and ``--print-config`` answer at once, as train.py's do.


# ----------------------------------------------------------------------------- logs

def link_file(target: Path, link: Path) -> None:
    """Point ``link`` at ``target`` (relative symlink), replacing an old link atomically.

    Falls back to a copy where symlinks are not supported.
    """
    target, link = Path(target), Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    rel = os.path.relpath(target, link.parent)
    try:
        os.symlink(rel, tmp)
    except (OSError, NotImplementedError):
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def append_val_log(C, text: str) -> None:
    """Append ``text`` to C.val_log_file and refresh C.link_val_log_file."""
    log = Path(C.val_log_file)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(text)
    link_file(log, Path(C.link_val_log_file))


# ----------------------------------------------------------------------------- entry point

#: where eval.py takes the validation protocol from (``--protocol``)
PROTOCOLS = ("checkpoint", "folder")


def build_parser(description: str = "Evaluate checkpoints on the validation list") \
        -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-e", "--epochs", default="last",
                   help="checkpoint(s): an epoch N, a range a-b or a-, 'last' (default), or a "
                        ".pth path")
    p.add_argument("-d", "--devices", default="",
                   help="cpu, 0, 0,1 or 0-3 (one process per device; default: GPU 0 if "
                        "present, else cpu)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the running metric after every image")
    p.add_argument("-s", "--save-images", "--save_image", dest="save_images",
                   action="store_true",
                   help="save composites: input | prediction | ground truth | variance | "
                        "errors")
    p.add_argument("-p", "--save-path", "--save_path", dest="save_path", default=None,
                   help="folder for -s (default <log_dir>/pred_imgs/<checkpoint name>/)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also measure how well variance, entropy, 1-max softmax and branch "
                        "disagreement find the wrong pixels (AUROC, AUPR) and the softmax "
                        "calibration (ECE, reliability diagram); runs both branches")
    p.add_argument("--run", default=None, metavar="METHOD-PRESET",
                   help="the runs of another method's script: its folder log/METHOD-PRESET "
                        "(e.g. u2pl-voc for trainu2pl.py in exp_voc); -e, the val logs and "
                        "saved images then refer to that folder (default: log/, DUEB's)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="checkpoint",
                   help="validation protocol (eval_mode, crop, scales, flip, ...): the one the "
                        "checkpoint's run recorded (default) or this folder's config.py; the "
                        "network always comes from the checkpoint, --set has the last word")
    from furnace.engine.cli import add_common_arguments
    add_common_arguments(p)
    return p


def run(C, epochs: str = "last", devices: Optional[Sequence[str]] = None,
        verbose: bool = False, save_images: bool = False,
        save_path: Optional[str] = None,
        model_factory: Optional[Callable] = None,
        uncertainty: bool = False, trust_pickle: bool = False,
        overrides: Sequence[str] = (), protocol: str = "checkpoint"
        ) -> List[Dict[str, object]]:
    """Evaluate the checkpoints of ``epochs`` (see snapshots.resolve_checkpoints) under config C.

    Each checkpoint is evaluated with the network (and, with ``protocol='checkpoint'``, the
    validation protocol) of the config it recorded (:func:`furnace.config.checkpoint_config`;
    ``'folder'``: C's protocol), ``overrides`` (the ``--set`` strings) applied last.
    Returns one dict per checkpoint: path, epoch, miou, miou_no_back, pixel_acc (fractions in
    [0, 1]), iou (list [C]), hist (int64 [C, C]), text (the result block) and save_dir.
    ``devices``: torch device strings (several: one process each, e.g. ['cpu', 'cpu']).
    ``model_factory(C)``: builds the network (default: the evaluation network of the method
    recorded in each checkpoint, :func:`furnace.eval.runner.build_model`). ``trust_pickle``:
    allow legacy checkpoints that need full unpickling (files you trust only).
    ``uncertainty``: add ``uncertainty`` (:meth:`UncertaintyMeter.compute`),
    ``uncertainty_text`` and ``reliability_png`` to each dict, the table to the output and log.
    """
    from furnace.data import build_eval_dataset
    from furnace.data.demo import prepare_from_config
    from furnace.engine.checkpoint import checkpoint_method, load_file

    from .loop import EvalError
    from .metrics import compute_metrics, format_results
    from .runner import MethodModel, evaluate_checkpoint, parse_devices
    from .snapshots import resolve_checkpoints
    from .uncertainty import UncertaintyMeter, format_uncertainty, save_reliability_diagram
    from .visualize import get_class_names
    if protocol not in PROTOCOLS:
        raise EvalError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    devices = list(devices) if devices else parse_devices(None)
    paths = resolve_checkpoints(epochs, C.snapshot_dir)
    prepare_from_config(C)
    folder_C, built, model, dataset = C, None, None, None
    results = []
    for path in paths:
        start = time.time()
        ckpt = load_file(path, trust_pickle=trust_pickle)
        recorded = ckpt.get("config") if isinstance(ckpt, dict) else None
        C = checkpoint_config(folder_C, recorded, overrides, protocol == "checkpoint",
                              source=f"{path} (its recorded config)")
        name = checkpoint_method(ckpt, path)
        if (name, C) != built:  # another network or protocol than the previous checkpoint
            factory = model_factory or MethodModel(name)
            model, dataset, built = factory(C), build_eval_dataset(C), (name, C)
            if len(dataset) == 0:
                raise EvalError(f"the eval list {C.eval_source} is empty")
        names = get_class_names(C.dataset, C.num_classes, C.get("class_names"))
        save_dir = None
        if save_images:
            if save_path is None:
                save_dir = Path(C.log_dir) / "pred_imgs" / path.stem
            else:  # -p PATH: PATH itself, or PATH/<checkpoint name> for several checkpoints
                save_dir = Path(save_path) / path.stem if len(paths) > 1 else Path(save_path)
            save_dir.mkdir(parents=True, exist_ok=True)
        meter = UncertaintyMeter(C.num_classes, devices[0]) if uncertainty else None
        hist, epoch = evaluate_checkpoint(C, path, devices, save_dir=save_dir,
                                          verbose=verbose, model=model, dataset=dataset,
                                          model_factory=factory, uncertainty=meter,
                                          trust_pickle=trust_pickle, ckpt=ckpt)
        m = compute_metrics(hist, C.get("eval_absent_iou", "skip"))
        text = format_results(m["iou"], m["miou"], m["miou_no_back"], m["pixel_acc"], names)
        extra = {}
        if meter is not None:
            u = meter.compute()
            png = Path(C.log_dir) / "reliability" / f"{path.stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            save_reliability_diagram(u, png, f"{path.name}: ECE {100 * u['ece']:.2f}%")
            extra = {"uncertainty": u, "uncertainty_text": format_uncertainty(u),
                     "reliability_png": str(png)}
            text_log = f"{text}\n{extra['uncertainty_text']}"
        else:
            text_log = text
        print(f"Model: {path}")
        print(text_log, flush=True)
        if meter is not None:
            print(f"reliability diagram: {extra['reliability_png']}", file=sys.stderr)
        print(f"evaluated {len(dataset)} images in {time.time() - start:.1f}s",
              file=sys.stderr)
        append_val_log(C, f"Model: {path}\n{text_log}\n")
        results.append({"path": str(path), "epoch": epoch, "miou": m["miou"],
                        "miou_no_back": m["miou_no_back"], "pixel_acc": m["pixel_acc"],
                        "iou": [float(v) for v in m["iou"]], "hist": hist, "text": text,
                        "save_dir": str(save_dir) if save_dir else None, **extra})
    return results


def main(exp_dir, argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Entry point of ``exp_*/eval.py``; returns the result dicts (see :func:`run`).

    Every checkpoint is evaluated with the network and (``--protocol checkpoint``, the
    default) the validation protocol its run recorded, whatever method wrote it; ``--set``
    overrides both. User errors (config, data, missing or mismatched checkpoint, bad -e/-d)
    print one line ``error: ...`` to stderr and exit with code 2.
    """
    args = build_parser().parse_args(argv)
    if args.save_path and os.path.exists(args.save_path) and not os.path.isdir(args.save_path):
        print(f"error: -p {args.save_path} is a file; -p takes the folder the images go to "
              "(it is created if missing)", file=sys.stderr)
        sys.exit(2)
    try:
        from furnace.engine.cli import log_legacy_env
        log_legacy_env()
        run_dir = [] if args.run is None else [f"log_dir={Path('log') / args.run}"]
        C = load_config(exp_dir, args.overrides, preset=run_dir)
        if args.print_config:
            from furnace.engine.cli import config_lines
            print("\n".join(config_lines(C)))
            return []
        from .runner import parse_devices
        devices = parse_devices(args.devices)
        return run(C, args.epochs, devices, verbose=args.verbose,
                   save_images=args.save_images, save_path=args.save_path,
                   uncertainty=args.uncertainty, trust_pickle=args.trust_pickle,
                   overrides=args.overrides, protocol=args.protocol)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        # DataError, CheckpointError and EvalError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
