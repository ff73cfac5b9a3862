"""The training run's logs on rank 0: the train log file, tensorboardX scalars and images.

Logging never stops or hangs training: a log file that cannot be written (full disk) and a
tensorboard writer whose thread died (its bounded queue would block the loop for ever) are
each reported once, as one warning line, and dropped.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from pathlib import Path
from typing import Dict, List

import torch

from ..config import Config

logger = logging.getLogger("furnace.engine")


class TrainLog:
    """Rank-0 logging (``enabled``): ``line`` to the train log file, ``scalars`` and
    ``images`` to tensorboard; a no-op on other ranks."""

    # seconds an event may wait for room in the writer's queue before the writer is dropped
    PUT_TIMEOUT = 10.0

    def __init__(self, C: Config, enabled: bool):
        self.file = None
        self.tb = None
        self.warnings: List[str] = []
        self._thread_errors: List[str] = []
        self._old_hook = None
        if not enabled:
            return
        Path(C.log_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(C.train_log_file, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # tensorboardX is optional at run time
            logger.warning("tensorboardX not installed: no tensorboard events")
            return
        try:
            self.tb = SummaryWriter(C.tb_dir)
        except OSError as e:
            self._drop_tb(f"cannot open tensorboard folder {C.tb_dir}: {e.strerror or e}")
            return
        self._guard_writer()

    def _writer(self):
        """tensorboardX's EventFileWriter of ``self.tb`` (None if its internals differ)."""
        fw = getattr(self.tb, "file_writer", None)
        return getattr(fw, "event_writer", None)

    def _guard_writer(self) -> None:
        """Catch the writer thread's death (its exception, for the warning, instead of a
        traceback on stderr) and bound how long an event waits for room in its queue."""
        ew = self._writer()
        worker, q = getattr(ew, "_worker", None), getattr(ew, "_event_queue", None)
        if worker is None or q is None:
            return
        self._old_hook = threading.excepthook

        def hook(args, _old=self._old_hook, _worker=worker):
            if args.thread is _worker:
                self._thread_errors.append(f"{args.exc_type.__name__}: {args.exc_value}")
            else:
                _old(args)
        threading.excepthook = hook

        def add_event(event, _q=q, _worker=worker):
            if not _worker.is_alive():
                raise WriterDead()
            try:
                _q.put(event, timeout=self.PUT_TIMEOUT)
            except queue.Full:
                raise WriterDead(f"its queue stayed full for {self.PUT_TIMEOUT:.0f} s") \
                    from None
        ew.add_event = add_event

    def _drop_tb(self, why: str) -> None:
        msg = f"tensorboard events stop here ({why}); training goes on without them"
        logger.warning(msg)
        self.warnings.append(msg)
        self.line("# warning: " + msg)
        ew, self.tb = self._writer(), None
        # no close(): it would flush through the dead thread's queue and block
        with contextlib.suppress(Exception):
            if ew is not None:
                ew._closed = True
                ew._ev_writer.close()

    def _tb_call(self, fn, *args) -> None:
        try:
            fn(*args)
        except WriterDead as e:
            why = self._thread_errors[0] if self._thread_errors else str(e) or "stopped"
            self._drop_tb(f"the event writer died: {why}")
        except OSError as e:
            self._drop_tb(f"cannot write events: {e.strerror or e}")

    def line(self, text: str) -> None:
        if self.file:
            try:
                self.file.write(text + "\n")
            except OSError as e:
                f, self.file = self.file, None
                with contextlib.suppress(OSError):
                    f.close()
                msg = (f"cannot write the train log ({e.strerror or e}); training goes on "
                       "without it")
                logger.warning(msg)
                self.warnings.append(msg)

    def scalars(self, values: Dict[str, float], step: int, prefix: str = "train") -> None:
        for k, v in values.items():
            if self.tb:
                self._tb_call(self.tb.add_scalar, f"{prefix}/{k}", v, step)

    def images(self, extras: Dict[str, torch.Tensor], C: Config, step: int) -> None:
        if not self.tb or "image" not in extras or "logits" not in extras:
            return
        mean = torch.tensor(C.image_mean, device=extras["image"].device).view(3, 1, 1)
        std = torch.tensor(C.image_std, device=extras["image"].device).view(3, 1, 1)
        img = (extras["image"][0].float() * std + mean).clamp(0, 1)
        pred = extras["logits"][0].argmax(0).float() / max(1, C.num_classes - 1)
        shown = [("train/input", img.cpu()), ("train/prediction", pred[None].cpu())]
        if extras.get("var") is not None:
            var = extras["var"][0, 0].float()
            var = (var - var.min()) / (var.max() - var.min() + 1e-12)
            shown.append(("train/variance", var[None].cpu()))
        for tag, image in shown:
            if self.tb:
                self._tb_call(self.tb.add_image, tag, image, step)

    def close(self) -> None:
        if self.tb:
            worker = getattr(self._writer(), "_worker", None)
            if worker is not None and not worker.is_alive():
                why = self._thread_errors[0] if self._thread_errors else "stopped"
                self._drop_tb(f"the event writer died: {why}")
            else:
                self._tb_call(self.tb.close)
            self.tb = None
        if self._old_hook is not None:
            threading.excepthook = self._old_hook
            self._old_hook = None
        if self.file:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


class WriterDead(Exception):
    """The tensorboard writer thread is gone (or stuck); its events would block the loop."""
