"""The multi-device evaluation runner: a checkpoint over the eval list on one or several
devices (one process each, images split into contiguous shards, histograms merged), with a
progress bar. ``furnace.eval.cli`` (eval.py) builds on it; it knows nothing of logs or
command lines.
"""
from __future__ import annotations

import math
import os
import queue as queue_mod
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from furnace.data import build_eval_dataset

from .loop import EvalError, evaluate_indices
from .metrics import compute_metrics
from .snapshots import checkpoint_epoch
from .uncertainty import UncertaintyMeter


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


def _running_line(hist: np.ndarray, absent_iou: str = "skip") -> str:
    m = compute_metrics(hist, absent_iou)
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
                bar.write(f"[{bar.n}/{n}] "
                          f"{_running_line(running, C.get('eval_absent_iou', 'skip'))}")
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
