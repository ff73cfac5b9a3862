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
import math
import os
import queue as queue_mod
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from furnace.config import ConfigError, checkpoint_config, load_config
from furnace.data import DataError, build_eval_dataset
from furnace.data.demo import prepare_from_config

from .loop import EvalError, evaluate_indices
from .metrics import compute_metrics, format_results
from .snapshots import checkpoint_epoch, resolve_checkpoints
from .uncertainty import UncertaintyMeter, format_uncertainty, save_reliability_diagram
from .visualize import get_class_names


# ----------------------------------------------------------------------------- devices

def parse_devices(spec: Optional[str]) -> List[str]:
    """Device list of ``-d``: ``cpu``, ``0``, ``0,1``, ``0-3`` (inclusive), ``*`` (all GPUs).

    Returns torch device strings ('cpu', 'cuda:0', ...). ``cpu`` may be repeated
    (``cpu,cpu``: two CPU processes). Default (None or ''): GPU 0 if CUDA is available, else
    CPU. GPU ids are checked against ``torch.cuda.device_count()``.
    """
    if spec is None or not str(spec).strip():
        return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out: List[str] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        if part == "cpu":
            out.append("cpu")
            continue
        if part == "*":
            if count == 0:
                raise EvalError("-d '*' asks for all GPUs but no CUDA device is visible; "
                                "use -d cpu")
            out += [f"cuda:{i}" for i in range(count)]
            continue
        if part.startswith("cuda:"):
            part = part[5:]
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise EvalError(f"-d {spec}: range {part} runs backwards; write {b}-{a}")
                ids = list(range(a, b + 1))
            else:
                ids = [int(part)]
        except ValueError:
            raise EvalError(f"-d {spec!r} is not understood; use cpu, a GPU id (0), a list "
                            "(0,1) or a range (0-3)") from None
        for i in ids:
            if i < 0 or i >= count:
                raise EvalError(f"-d {spec}: GPU {i} requested but {count} CUDA device(s) "
                                f"are visible" + ("; use -d cpu" if count == 0 else
                                                  f" (ids 0-{count - 1})"))
            out.append(f"cuda:{i}")
    if not out:
        raise EvalError(f"-d {spec!r} names no device; use cpu or GPU ids such as 0,1")
    if len(set(d for d in out if d != "cpu")) != len([d for d in out if d != "cpu"]):
        raise EvalError(f"-d {spec}: a GPU is listed twice")
    return out


def shard_indices(n: int, parts: int) -> List[range]:
    """Contiguous chunks of ceil(n / parts) indices (the reference's split); may be empty."""
    size = max(1, math.ceil(n / max(parts, 1)))
    return [range(min(i * size, n), min((i + 1) * size, n)) for i in range(parts)]


# ----------------------------------------------------------------------------- one shard

def build_model(C, method: str = "dueb") -> torch.nn.Module:
    """The evaluation network of ``method`` (the one that wrote the checkpoint; reference
    checkpoints are DUEB's) for config C, without pretrained weights."""
    from furnace.methods import get_method
    return get_method(method).build_eval_model(C)


class MethodModel:
    """A picklable model factory for spawned evaluation processes: ``build_model(C, method)``."""

    def __init__(self, method: str):
        self.method = method

    def __call__(self, C) -> torch.nn.Module:
        return build_model(C, self.method)


def load_checkpoint(model: torch.nn.Module, path, trust_pickle: bool = False,
                    ckpt=None) -> Optional[int]:
    """Load the evaluation weights of ``path`` into ``model`` (the entry the method that wrote
    it names, ``model`` for DUEB and reference files); returns the checkpoint's epoch (or
    None). ``trust_pickle``: allow full unpickling (legacy files you trust only). ``ckpt``:
    the file's contents when already read."""
    from furnace.engine.checkpoint import checkpoint_method, load_file, load_model_weights
    from furnace.methods import method_names, get_method
    if ckpt is None:
        ckpt = load_file(path, trust_pickle=trust_pickle)
    name = checkpoint_method(ckpt)
    key = get_method(name).eval_weights_key(ckpt) if name in method_names() else "model"
    weights = {"model": ckpt[key]} if isinstance(ckpt, dict) and key in ckpt else ckpt
    load_model_weights(model, path, weights)
    epoch = checkpoint_epoch(path)
    if epoch is None and isinstance(ckpt, dict) and isinstance(ckpt.get("epoch"), int):
        epoch = ckpt["epoch"]
    return epoch


def _worker(rank: int, C, path: str, device: str, indices: range, save_dir, verbose: bool,
            threads: int, model_factory, q, uncertainty: bool = False,
            trust_pickle: bool = False) -> None:
    """Process body for one device: evaluate its shard, report per image and at the end."""
    try:
        torch.set_num_threads(max(1, threads))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        model = model_factory(C)
        epoch = load_checkpoint(model, path, trust_pickle)
        dataset = build_eval_dataset(C)

        def tick(hist):
            q.put(("image", rank, hist.cpu().numpy() if verbose else None))

        meter = UncertaintyMeter(C.num_classes, device) if uncertainty else None
        hist = evaluate_indices(model, C, dataset, indices, device,
                                Path(save_dir) if save_dir else None, tick,
                                uncertainty=meter)
        q.put(("done", rank, (hist, epoch, meter.state() if meter is not None else None)))
    except BaseException as e:  # reported to the parent, which prints one line
        if not isinstance(e, (ValueError, OSError)):
            traceback.print_exc()
        q.put(("error", rank, f"{e}" if isinstance(e, (ValueError, OSError))
               else f"{type(e).__name__}: {e}"))


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


def _running_line(hist: np.ndarray) -> str:
    m = compute_metrics(hist)
    return (f"mIoU {m['miou'] * 100:.3f}%  mIoU(no_back) {m['miou_no_back'] * 100:.3f}%  "
            f"mACC {m['pixel_acc'] * 100:.3f}%")


def evaluate_checkpoint(C, path, devices: Sequence[str], *, save_dir: Optional[Path] = None,
                        verbose: bool = False, model: Optional[torch.nn.Module] = None,
                        dataset=None, model_factory: Callable = build_model,
                        uncertainty: Optional[UncertaintyMeter] = None,
                        trust_pickle: bool = False, ckpt=None
                        ) -> Tuple[np.ndarray, Optional[int]]:
    """Confusion histogram [C, C] of checkpoint ``path`` over the eval list, and its epoch.

    The images are split into contiguous shards of ceil(N / len(devices)) (the reference's
    split); the first shard runs in this process on ``devices[0]`` (``model``/``dataset``
    reused when given), every other shard in a spawned process on its device, and the
    histograms are summed. ``model_factory(C)`` builds the network (a module-level function,
    so that spawned processes can import it). ``uncertainty``: a meter (on ``devices[0]``)
    that receives every image; the other processes' histograms are merged into it.
    ``ckpt``: the contents of ``path`` when already read (this process loads them once).
    """
    if dataset is None:
        dataset = build_eval_dataset(C)
    n = len(dataset)
    shards = shard_indices(n, len(devices))
    if model is None:
        model = model_factory(C)

    procs, q = [], None
    if len(devices) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        n_cpu = sum(d == "cpu" for d in devices)
        threads = max(1, (os.cpu_count() or 1) // max(n_cpu, 1))
        for rank in range(1, len(devices)):
            dev, idx = devices[rank], shards[rank]
            if len(idx) == 0:
                continue
            p = ctx.Process(target=_worker, name=f"eval-{dev}-{rank}",
                            args=(rank, C, str(path), dev, idx,
                                  str(save_dir) if save_dir else None, verbose,
                                  threads if dev == "cpu" else 1, model_factory, q,
                                  uncertainty is not None, trust_pickle))
            p.start()
            procs.append((rank, p))
        for rank, dev in enumerate(devices):
            if len(shards[rank]):
                print(f"{dev} handles {len(shards[rank])} images", file=sys.stderr)

    hist = np.zeros((C.num_classes, C.num_classes), dtype=np.int64)
    running = np.zeros_like(hist)
    pending = {rank for rank, _ in procs}
    state = {"error": None, "epoch": None}
    bar = _progress(n, f"eval {Path(path).name}")

    def handle(kind, rank, payload):
        if kind == "image":
            bar.update(1)
            if verbose and payload is not None:
                running[...] += payload
                bar.write(f"[{bar.n}/{n}] {_running_line(running)}")
        elif kind == "done":
            hist[...] += payload[0]
            if uncertainty is not None and payload[2] is not None:
                uncertainty.merge(payload[2])
            pending.discard(rank)
        else:
            state["error"] = f"on {devices[rank]}: {payload}"

    def drain(block: bool):
        """Handle queued worker messages; with ``block``, wait until all workers are done."""
        while pending and state["error"] is None:
            try:
                handle(*q.get(timeout=1.0) if block else q.get_nowait())
            except queue_mod.Empty:
                if not block:
                    return
                dead = [(r, p.exitcode) for r, p in procs
                        if r in pending and p.exitcode is not None]
                if dead:
                    state["error"] = (f"evaluation process {dead[0][0]} ({devices[dead[0][0]]}) "
                                      f"exited with code {dead[0][1]} without a result")
            if state["error"] is not None:
                raise EvalError(state["error"])

    def tick(h):
        handle("image", 0, h.cpu().numpy() if verbose else None)
        if procs:
            drain(block=False)

    old_threads = torch.get_num_threads()
    try:
        if procs and devices[0] == "cpu":
            torch.set_num_threads(threads)
        state["epoch"] = load_checkpoint(model, path, trust_pickle, ckpt)
        hist += evaluate_indices(model, C, dataset, shards[0], devices[0], save_dir, tick,
                                 uncertainty=uncertainty)
        if procs:
            drain(block=True)
    finally:
        torch.set_num_threads(old_threads)
        bar.close()
        for _, p in procs:
            if p.is_alive() and (state["error"] is not None or pending):
                p.terminate()
            p.join()
    if state["error"] is not None:
        raise EvalError(state["error"])
    return hist, state["epoch"]


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
    recorded in each checkpoint, see :func:`build_model`). ``trust_pickle``: allow legacy
    checkpoints that need full unpickling (files you trust only).
    ``uncertainty``: add ``uncertainty`` (:meth:`UncertaintyMeter.compute`),
    ``uncertainty_text`` and ``reliability_png`` to each dict, the table to the output and log.
    """
    from furnace.engine.checkpoint import checkpoint_method, load_file
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
        m = compute_metrics(hist)
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
    from furnace.engine.checkpoint import CheckpointError
    try:
        from furnace.engine.cli import log_legacy_env
        log_legacy_env()
        C = load_config(exp_dir, args.overrides)
        if args.print_config:
            from furnace.engine.cli import config_lines
            print("\n".join(config_lines(C)))
            return []
        devices = parse_devices(args.devices)
        return run(C, args.epochs, devices, verbose=args.verbose,
                   save_images=args.save_images, save_path=args.save_path,
                   uncertainty=args.uncertainty, trust_pickle=args.trust_pickle,
                   overrides=args.overrides, protocol=args.protocol)
    except (ConfigError, DataError, CheckpointError, EvalError, FileNotFoundError,
            ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
