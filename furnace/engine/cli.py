"""Command line of the train scripts (``train.py``, ``trainal.py``, ``traine.py``, ...).

Flags of the reference Engine: ``-c/--continue`` (a checkpoint path, or ``last``), ``-d``
(device), ``--local_rank``/``--local-rank`` (torchrun passes ``LOCAL_RANK`` too), ``-p`` (port,
used as MASTER_PORT when not set), ``--debug [N]`` (N iterations per epoch), plus
``--set key=value ...``. Errors a user can fix are printed as one line (exit code 2).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError, add_config_arguments, engine_log_level, load_config


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-c", "--continue", dest="continue_fpath", default=None,
                   help="resume from this checkpoint, or 'last' for <snapshot_dir>/epoch-last.pth")
    p.add_argument("-d", "--devices", default="",
                   help="device for a single process: cpu, 0, cuda:1 (default: GPU 0 if present)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed launchers; torchrun uses LOCAL_RANK")
    p.add_argument("-p", "--port", default="16001", help="MASTER_PORT if the launcher sets none")
    p.add_argument("--debug", type=int, nargs="?", const=10, default=0,
                   help="run only N (default 10) iterations per epoch")
    add_config_arguments(p)
    return p


def resolve_resume(spec: Optional[str], snapshot_dir: str) -> Optional[str]:
    if not spec:
        return None
    path = Path(snapshot_dir) / "epoch-last.pth" if spec == "last" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"-c {spec}: checkpoint {path} does not exist; "
                                f"checkpoints of this experiment are in {snapshot_dir}")
    return str(path)


def train_main(exp_dir: str, *, aleatoric: bool, energy: bool, supervised_only: bool = False,
               argv: Optional[Sequence[str]] = None, description: str = "DUEB training") -> int:
    """Entry point of the experiment train scripts; returns 0 or exits with code 2."""
    from ..data import DataError
    from .checkpoint import CheckpointError
    from .dist import cleanup, setup
    from .trainer import NonFiniteLossError, train

    args = build_parser(description).parse_args(argv)
    preset = [f"aleatoric.enabled={aleatoric}", f"energy.enabled={energy}",
              f"supervised_only={supervised_only}"]
    os.environ.setdefault("MASTER_PORT", str(args.port))
    try:
        logging.basicConfig(level=engine_log_level(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # --debug goes through the config so that it is validated with the other values
        debug = [f"debug={args.debug}"] if args.debug else []
        C = load_config(exp_dir, args.overrides + debug, preset=preset)
        resume = resolve_resume(args.continue_fpath, C.snapshot_dir)
        info = setup(args.devices, args.local_rank)
        try:
            train(C, info, resume)
        finally:
            cleanup()
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, NonFiniteLossError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return 0
