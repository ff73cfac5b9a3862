"""Command line of the train scripts (``train.py``, ``trainal.py``, ``traine.py``, ...).

Flags of the reference Engine: ``-c/--continue`` (a checkpoint path, or ``last``), ``-d``
(device), ``--local_rank``/``--local-rank`` (torchrun passes ``LOCAL_RANK`` too), ``--port``
(the reference's ``-p``, used as MASTER_PORT when not set; ``-p`` is eval.py's image folder,
so train.py refuses it with a hint), ``--debug [N]`` (N iterations per epoch), plus
``--set key=value ...``, ``--print-config`` and ``--trust-pickle``. Errors a user can fix are
printed as one line (exit code 2); a preemption signal saves a checkpoint and exits with
128 + the signal number. Torch is imported only after the arguments are parsed, so ``--help``
answers at once.
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
    # -p is eval.py's image folder; the reference's train -p (port) is --port here, so one
    # flag never means two things
    p.add_argument("--port", default="16001", help="MASTER_PORT if the launcher sets none")
    p.add_argument("-p", dest="old_port", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", type=int, nargs="?", const=10, default=0,
                   help="run only N (default 10) iterations per epoch")
    add_common_arguments(p)
    return p


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared, with the same meaning, by train.py and eval.py."""
    add_config_arguments(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (after presets, environment and --set, "
                        "with derived values) and exit")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoints with full unpickling: needed only for legacy files "
                        "holding Python objects, and it can run code hidden in the file; use "
                        "it only for files you made or trust")


# Environment variables of the reference code (REFERENCE 1.5) and the keys they set.
LEGACY_ENV = (("volna", "the data root (DATA/)"), ("snapshot_dir", "snapshot_dir"),
              ("learning_rate", "lr"), ("batch_size", "batch_size"),
              ("snapshot_iter", "snapshot_iter"), ("debug", "debug"))


def log_legacy_env(env=None) -> None:
    """One log line per legacy environment override in effect (they act silently otherwise)."""
    env = os.environ if env is None else env
    log = logging.getLogger("furnace.config")
    for var, what in LEGACY_ENV:
        if env.get(var):
            log.warning("environment %s=%s sets %s (reference convention; --set wins)",
                        var, env[var], what)


def config_lines(C, prefix: str = "") -> list:
    """``key = value`` lines of a config, nested groups as dotted keys, sorted."""
    lines = []
    for key in sorted(C):
        value = C[key]
        if isinstance(value, dict):
            lines += config_lines(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} = {value!r}")
    return lines


def resolve_resume(spec: Optional[str], snapshot_dir: str) -> Optional[str]:
    if not spec:
        return None
    path = Path(snapshot_dir) / "epoch-last.pth" if spec == "last" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"-c {spec}: checkpoint {path} does not exist; "
                                f"checkpoints of this experiment are in {snapshot_dir}")
    return str(path)


def train_main(exp_dir: str, *, method: Optional[str] = None, preset: Optional[str] = None,
               argv: Optional[Sequence[str]] = None, description: str = "training") -> int:
    """Entry point of the experiment train scripts; returns 0 or exits (2: a user error,
    128 + N: stopped by signal N after saving a resumable checkpoint).

    ``method``/``preset`` choose a registered method and one of its presets (train.py:
    ``method='dueb', preset='full'``).
    """
    args = build_parser(description).parse_args(argv)
    if args.old_port is not None:
        print(f"error: -p {args.old_port}: -p is eval.py's folder for saved images; the master "
              f"port of train.py is --port (e.g. --port {args.old_port})", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("MASTER_PORT", str(args.port))

    try:
        logging.basicConfig(level=engine_log_level(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log_legacy_env()
        # --debug goes through the config so that it is validated with the other values
        debug = [f"debug={args.debug}"] if args.debug else []
        from ..methods.presets import script_overrides
        C = load_config(exp_dir, args.overrides + debug,
                        preset=script_overrides(method, preset))
        if args.print_config:
            from ..methods.presets import method_name, presets_of
            # an unknown method is an error here too, not exit 0 (built-in names are known
            # without importing torch)
            presets_of(method_name(C))
            print(f"# method: {method_name(C)}")
            print("\n".join(config_lines(C)))
            return 0
        from .dist import cleanup, setup
        from .trainer import train
        resume = resolve_resume(args.continue_fpath, C.snapshot_dir)
        info = setup(args.devices, args.local_rank)
        try:
            train(C, info, resume, trust_pickle=args.trust_pickle)
        finally:
            cleanup()
    except KeyboardInterrupt:
        # the second Ctrl-C: stop at once, without the traceback of wherever the loop was
        print("interrupted by SIGINT (Ctrl-C twice): stopped at once without saving; the "
              "checkpoints written before are intact (resume with -c last)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # the run's own exception types live in modules that import torch; look them up
        # only when something was raised
        interrupted = sys.modules.get("furnace.engine.trainer")
        if interrupted is not None and isinstance(e, interrupted.TrainingInterrupted):
            print(str(e), file=sys.stderr)
            sys.exit(128 + e.signum)
        if _user_error(e):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    return 0


def _user_error(e: BaseException) -> bool:
    """Errors a user can fix (printed as one line): config, data, checkpoint, run guard,
    missing files, NaN losses and other ValueErrors."""
    if isinstance(e, (ConfigError, FileNotFoundError, ValueError)):
        return True
    trainer = sys.modules.get("furnace.engine.trainer")
    return trainer is not None and isinstance(e, trainer.NonFiniteLossError)
