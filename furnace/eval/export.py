"""Pseudo-label export: a checkpoint's predictions over a training list, written as index PNGs,
and the list file that trains on them (LPL spec 4.2, 10.2 item 10).

    python export.py -e CKPT --list LIST --out DIR [--keep-labelled LIST] [-d cpu|0|0,1]
                     [--no-class-mask] [--list-out FILE] [--protocol checkpoint|folder]
                     [--set key=value ...]

The network is rebuilt from the checkpoint's recorded config and loaded as eval.py does (the
weights entry its method names); the evaluation protocol (eval_mode, scales, flip, eval_resize,
...) is the checkpoint's unless ``--protocol folder``; ``--set`` has the last word. Each image
of the list is predicted, by default with its argmax restricted to the classes of its ground
truth (the image-level label), and written as ``<DIR>/<id>.png`` (uint8, one channel, palette
for viewing; written to a temporary file and renamed). The export is resumable: an image whose
PNG exists and decodes is skipped. The list file written holds every id of LIST in order:
``<id>`` (its ground truth) for the ids of ``--keep-labelled``, ``<id>\\t./<path>.png`` for the
others, the framework's pseudo-label list format (Cityscapes: ``<image>\\t<png>``).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from furnace.config import ConfigError, checkpoint_config, load_config

#: Test hook: the export process kills itself (SIGKILL) after writing this many PNGs, to
#: check that an interrupted export resumes. Not for users.
STOP_AFTER_ENV = "FURNACE_EXPORT_STOP_AFTER"


# ----------------------------------------------------------------------------- files

def png_is_valid(path: Path) -> bool:
    """True when ``path`` is a PNG that decodes to a single-channel 2-D image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode not in ("P", "L"):
                return False
            im.load()
        return True
    except Exception:      # any decoding problem means: predict it again
        return False


def write_label_png(path: Path, label: np.ndarray, palette: Optional[np.ndarray] = None
                    ) -> None:
    """Write ``label`` (integer [H, W], values 0..255) as a palette PNG atomically (a temporary
    file in the same folder, then a rename): a reader never sees a partial file."""
    from PIL import Image
    arr = np.ascontiguousarray(label, dtype=np.uint8)
    im = Image.frombytes("P" if palette is not None else "L", (arr.shape[1], arr.shape[0]),
                         arr.tobytes())
    if palette is not None:
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[:len(palette)] = palette
        im.putpalette(pal.ravel().tolist())
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Path) -> List[str]:
    """Delete ``.<name>.png.tmp<pid>`` files of :func:`write_label_png` whose process is gone
    (an export killed while writing); returns their names."""
    from furnace.engine.checkpoint import _pid_alive
    gone = []
    for p in Path(folder).iterdir():
        name, _, pid = p.name.rpartition(".tmp")
        if p.name.startswith(".") and name.endswith(".png") and pid.isdigit() \
                and not _pid_alive(int(pid)):
            p.unlink()
            gone.append(p.name)
    return gone


def _first_columns(list_file: str) -> List[str]:
    return [line.split("\t")[0].strip() for line in _lines(list_file)]


def _lines(list_file: str) -> List[str]:
    from furnace.data.datasets import read_list_file
    return [line.strip() for _, line in read_list_file(list_file)]


def _resolve_list(root: str, source: str, what: str) -> str:
    """A list path relative to dataset_path (as the *_source keys), absolute, or relative to
    the working folder."""
    from furnace.data.datasets import DataError, resolve_source
    path = resolve_source(root, source, what)
    if not os.path.isfile(path) and os.path.isfile(source):
        path = os.path.abspath(source)
    if not os.path.isfile(path):
        raise DataError(f"{what} list not found: {source} (looked for {path}; give a path "
                        f"relative to dataset_path, or an absolute one)")
    return path


class _ExportItems:
    """The list's images for :func:`furnace.eval.loop.predict_indices`: items ``{'data',
    'fn'}`` plus ``'label'`` when the class mask needs it (a missing label file is then the
    dataset's DataError naming it; without the mask, labels are not read)."""

    def __init__(self, dataset, with_label: bool):
        self.dataset = dataset
        self.with_label = with_label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        img, label = self.dataset.load(i, with_label=self.with_label)
        item = {"data": img, "fn": self.dataset.entries[i].fn}
        if label is not None:
            item["label"] = label
        return item


# ----------------------------------------------------------------------------- one shard

def _export_shard(C, method: str, path: str, items: _ExportItems, indices: Sequence[int],
                  out_dir: str, device: str, class_mask: bool, trust_pickle: bool,
                  tick) -> None:
    """Predict ``indices`` of ``items`` on ``device`` and write their PNGs; ``tick()`` after
    each."""
    import torch

    from .loop import predict_indices
    from .runner import build_model, load_checkpoint
    from .visualize import get_palette
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    model = build_model(C, method)
    load_checkpoint(model, path, trust_pickle)
    palette = get_palette(C.dataset, C.num_classes)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    written = 0
    for item, out, _ in predict_indices(model, C, items, indices, device,
                                        class_mask=class_mask):
        pred = out.pred.cpu().numpy()
        if pred.shape != item["data"].shape[:2]:
            raise ValueError(f"prediction of {item['fn']} is {pred.shape}, not the image size "
                             f"{item['data'].shape[:2]}")
        write_label_png(Path(out_dir) / f"{item['fn']}.png", pred, palette)
        written += 1
        tick()
        if stop_after and written >= stop_after:
            os.kill(os.getpid(), signal.SIGKILL)


def _worker(rank, C, method, path, items, indices, out_dir, device, class_mask,
            trust_pickle, threads, q) -> None:
    """Process body for one extra device: report each image, then done (or the error)."""
    import torch
    try:
        torch.set_num_threads(max(1, threads))
        _export_shard(C, method, path, items, indices, out_dir, device, class_mask,
                      trust_pickle, lambda: q.put(("image", rank, None)))
        q.put(("done", rank, None))
    except BaseException as e:       # reported to the parent, which prints one line
        q.put(("error", rank, f"{e}" if isinstance(e, (ValueError, OSError))
               else f"{type(e).__name__}: {e}"))


# ----------------------------------------------------------------------------- export

def export_pseudo_labels(C, checkpoint_path, list_file: str, out_dir, *,
                         devices: Sequence[str] = ("cpu",), class_mask: bool = True,
                         keep_labelled: Optional[str] = None, list_out=None,
                         overrides: Iterable[str] = (), protocol: str = "checkpoint",
                         trust_pickle: bool = False, part: Tuple[int, int] = (0, 1)
                         ) -> Optional[Path]:
    """Write pseudo labels of checkpoint ``checkpoint_path`` for every id of ``list_file``.

    C: the experiment's finalised config (data paths); the network keys, and with
        ``protocol='checkpoint'`` the eval_* protocol keys, come from the checkpoint's
        recorded config, then ``overrides`` (``--set`` strings).
    list_file: a training list (relative to dataset_path, or absolute), e.g. the full ordered
        training list; every id is exported, in order.
    out_dir: folder of the PNGs ``<id>.png`` (uint8 [H, W], values 0..C-1, the image's size).
    devices: torch device strings; several split the images into contiguous shards, one
        process per device.
    class_mask: restrict each argmax to the classes present in the image's ground truth
        (:func:`furnace.data.image_labels.image_level_label`); every image then needs its mask file
        (a missing one is a DataError naming it). False: plain argmax, masks not read.
    keep_labelled: a list of the pixel-labelled ids (same form as ``list_file``): their lines
        in the written list keep the ground truth.
    list_out: the list file to write (default ``<out_dir>/../<list stem>_<out_dir name>.txt``).
    part: ``(k, parts)``: export only every ``parts``-th missing image from the k-th (the
        processes of a distributed run share the work this way) and write no list (None is
        returned); a call with the default ``(0, 1)`` afterwards checks and lists them all.
    Resumable: images whose PNG exists and decodes are skipped. Returns the written list path.
    """
    from furnace.data.datasets import DataError, build_dataset, canonical_layout, check_root
    from furnace.data.demo import prepare_from_config
    from furnace.engine.checkpoint import checkpoint_method, load_file

    from .loop import EvalError
    from .runner import _progress, shard_indices
    ckpt = load_file(checkpoint_path, trust_pickle=trust_pickle)
    recorded = ckpt.get("config") if isinstance(ckpt, dict) else None
    C = checkpoint_config(C, recorded, overrides, protocol == "checkpoint",
                          source=f"{checkpoint_path} (its recorded config)")
    method = checkpoint_method(ckpt, checkpoint_path)
    del ckpt
    if C.eval_mode in ("center_pad", "resize"):
        raise ConfigError(f"config key 'eval_mode' is {C.eval_mode!r}, which predicts a crop, "
                          f"not the image; a pseudo label covers the whole image: --set "
                          f"eval_mode=whole (or slide)")
    prepare_from_config(C)
    layout = canonical_layout(C.dataset)
    root = check_root(C.dataset_path, layout)
    src = _resolve_list(root, list_file, "--list")
    dataset = build_dataset(C.dataset, root, src, "eval", num_classes=C.num_classes,
                            allow_outside_root=bool(C.get("allow_outside_root", False)),
                            voc_folder=C.get("voc_train_folder"))
    src_lines = _lines(src)
    columns = [line.split("\t")[0].strip() for line in src_lines]
    keep = set()
    if keep_labelled is not None:
        keep = set(_first_columns(_resolve_list(root, keep_labelled, "--keep-labelled")))
        missing = sorted(keep - set(columns))
        if missing:
            raise DataError(f"--keep-labelled {keep_labelled}: {len(missing)} id(s) are not in "
                            f"{src} (e.g. {missing[0]}); the labelled ids must be part of "
                            f"the exported list")
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    names = dataset.names
    pngs = [out / f"{fn}.png" for fn in names]
    todo = [i for i, p in enumerate(pngs) if not png_is_valid(p)]
    n, skipped = len(pngs), len(pngs) - len(todo)
    k, parts = (int(v) for v in part)
    todo = todo[k::parts]

    devices = list(devices) or ["cpu"]
    items = _ExportItems(dataset, class_mask)
    shards = [list(todo[r.start:r.stop]) for r in shard_indices(len(todo), len(devices))]
    bar = _progress(n, f"export {Path(checkpoint_path).name}")
    bar.update(skipped)
    bar.set_postfix_str(f"skipped {skipped} existing")
    procs, q = [], None
    if len(devices) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        threads = max(1, (os.cpu_count() or 1) // max(1, sum(d == "cpu" for d in devices)))
        for rank in range(1, len(devices)):
            if not shards[rank]:
                continue
            p = ctx.Process(target=_worker, name=f"export-{devices[rank]}-{rank}",
                            args=(rank, C, method, str(checkpoint_path), items, shards[rank],
                                  str(out), devices[rank], class_mask, trust_pickle,
                                  threads if devices[rank] == "cpu" else 1, q))
            p.start()
            procs.append((rank, p))
    pending = {rank for rank, _ in procs}
    error = []

    def drain(block: bool) -> None:
        import queue as queue_mod
        while pending and not error:
            try:
                kind, rank, payload = q.get(timeout=1.0) if block else q.get_nowait()
            except queue_mod.Empty:
                if not block:
                    return
                dead = [(r, p.exitcode) for r, p in procs if r in pending
                        and p.exitcode is not None]
                if dead:
                    error.append(f"export process {dead[0][0]} ({devices[dead[0][0]]}) exited "
                                 f"with code {dead[0][1]} without finishing")
                continue
            if kind == "image":
                bar.update(1)
            elif kind == "done":
                pending.discard(rank)
            else:
                error.append(f"on {devices[rank]}: {payload}")
        if error:
            raise EvalError(error[0])

    def tick() -> None:
        bar.update(1)
        if procs:
            drain(block=False)

    try:
        if shards[0]:
            _export_shard(C, method, str(checkpoint_path), items, shards[0], str(out),
                          devices[0], class_mask, trust_pickle, tick)
        if procs:
            drain(block=True)
    finally:
        bar.close()
        for _, p in procs:
            if p.is_alive() and (error or pending):
                p.terminate()
            p.join()
    if parts > 1:
        return None
    bad = [str(p) for p in pngs if not png_is_valid(p)]
    if bad:
        raise EvalError(f"{len(bad)} pseudo label(s) were not written (e.g. {bad[0]}); run "
                        f"the export again to finish them")

    target = Path(list_out).expanduser().absolute() if list_out else \
        out.parent / f"{Path(src).stem}_{out.name}.txt"
    lines = []
    for i, (col, png) in enumerate(zip(columns, pngs)):
        if col in keep:
            lines.append(col if layout == "voc" else src_lines[i])
        elif layout == "voc":
            rel = os.path.relpath(png, target.parent)
            lines.append(f"{col}\t{rel if rel.startswith('..') else './' + rel}")
        else:      # Cityscapes columns are relative to the dataset root ('/' = under it)
            inside = str(png).startswith(str(Path(root).absolute()) + os.sep)
            lines.append(f"{col}\t/{os.path.relpath(png, root)}" if inside else
                         f"{col}\t{png}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, target)
    print(f"pseudo labels: {n} images in {out} ({n - skipped} predicted, {skipped} existing); "
          f"list {target} ({len(keep)} ids keep their ground truth)", file=sys.stderr)
    return target


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from .cli import PROTOCOLS
    p = argparse.ArgumentParser(description="Write pseudo labels of a checkpoint for a "
                                            "training list (resumable)")
    p.add_argument("-e", "--epochs", default="last",
                   help="the checkpoint: an epoch N, 'last' (default) or a .pth path")
    p.add_argument("--list", required=True, dest="list_file",
                   help="the training list to label (relative to dataset_path, or absolute)")
    p.add_argument("--out", required=True, help="folder of the pseudo-label PNGs")
    p.add_argument("--keep-labelled", default=None,
                   help="list of the pixel-labelled ids: they keep their ground truth in the "
                        "written list")
    p.add_argument("--list-out", default=None,
                   help="the list file to write (default <out>/../<list stem>_<out name>.txt)")
    p.add_argument("-d", "--devices", default="",
                   help="cpu, 0, 0,1 or 0-3 (one process per device; default: GPU 0 if "
                        "present, else cpu)")
    p.add_argument("--no-class-mask", dest="class_mask", action="store_false",
                   help="plain argmax (default: only over the classes of each image's ground "
                        "truth, which every image then needs)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="checkpoint",
                   help="evaluation protocol: the checkpoint run's (default) or this folder's "
                        "config.py; --set has the last word")
    from furnace.engine.cli import add_common_arguments
    add_common_arguments(p)
    return p


def main(exp_dir, argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Entry point of ``exp_*/export.py``; returns the written list path. User errors print
    one line ``error: ...`` and exit with code 2."""
    args = build_parser().parse_args(argv)
    try:
        C = load_config(exp_dir, args.overrides)
        if args.print_config:
            from furnace.engine.cli import config_lines
            print("\n".join(config_lines(C)))
            return None
        from .runner import parse_devices
        from .snapshots import resolve_checkpoints
        paths = resolve_checkpoints(args.epochs, C.snapshot_dir)
        if len(paths) != 1:
            raise ValueError(f"-e {args.epochs} selects {len(paths)} checkpoints; the export "
                             f"takes one (an epoch N, 'last' or a .pth path)")
        return export_pseudo_labels(C, paths[0], args.list_file, args.out,
                                    devices=parse_devices(args.devices),
                                    class_mask=args.class_mask,
                                    keep_labelled=args.keep_labelled, list_out=args.list_out,
                                    overrides=args.overrides, protocol=args.protocol,
                                    trust_pickle=args.trust_pickle)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
