"""Start-of-run guards: one writer per snapshot folder, and a probe of the output folders.

Two trainings writing to one snapshot folder overwrite each other's checkpoints (and, with
one log name, interleave their logs) while both exit 0. :class:`SnapshotLock` holds an
advisory lock on ``<snapshot_dir>/.train.lock`` for the whole run; the file names the holder
(pid, host, start time) so that the second run's error says who is writing. The operating
system drops the lock when its process dies, so a killed run never leaves a stale lock.

:func:`probe_folder` finds an unwritable log or snapshot folder at the start (not at the first
save, hours later) and warns when the disk holds less than about two checkpoints.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator, Mapping, Optional

try:
    import fcntl
except ImportError:  # Windows: exclusive-create fallback below
    fcntl = None

logger = logging.getLogger("furnace.engine")

LOCK_NAME = ".train.lock"

# Parameters (millions) of the dual-branch network per backbone (head_channels 256, 21
# classes); a checkpoint holds the weights and both optimisers' momentum, float32.
_PARAMS_M = {"resnet18": 33.5, "resnet34": 53.7, "resnet50": 81.0, "resnet101": 118.9}


class RunError(ValueError):
    """A run cannot start: its output folder is in use or not writable. One line, with the fix."""


def _holder_text() -> str:
    started = datetime.datetime.now().isoformat(timespec="seconds")
    return f"pid={os.getpid()} host={socket.gethostname()} started={started}\n"


def _describe_holder(text: str) -> str:
    fields = dict(p.split("=", 1) for p in text.split() if "=" in p)
    if "pid" not in fields:
        return "another training"
    where = f" on {fields['host']}" if fields.get("host") else ""
    since = f", started {fields['started']}" if fields.get("started") else ""
    return f"another training (pid {fields['pid']}{where}{since})"


class SnapshotLock:
    """Exclusive use of a snapshot folder by one training process.

    Use ``with SnapshotLock(folder):`` around the run; a second holder raises :class:`RunError`
    naming the first one's pid. The lock file is removed on release.
    """

    def __init__(self, folder: os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def _busy(self, text: str) -> RunError:
        return RunError(f"snapshot folder {self.folder} is in use by {_describe_holder(text)}; "
                        f"wait for it to finish, or give this run its own folder with "
                        f"--set log_dir=<other> (or snapshot_dir=<other>)")

    def acquire(self) -> "SnapshotLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self._acquire_exclusive()
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    # a file system without locks (some network mounts): run unguarded
                    logger.warning("cannot lock snapshot folder %s (%s); a second training on "
                                   "it would not be detected", self.folder, e.strerror or e)
                    return self
                raise self._busy(self._read()) from None
            # the holder may have removed the file between our open and lock: retry on the
            # file now at that path, else two runs would hold locks on different files
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, _holder_text().encode())
                self._fd = fd
                return self
            os.close(fd)
        raise RunError(f"cannot lock snapshot folder {self.folder}: the lock file keeps changing")

    def _acquire_exclusive(self) -> "SnapshotLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            text = self._read()
            raise RunError(str(self._busy(text)) + f" (if no run is active, delete {self.path})") \
                from None
        os.write(fd, _holder_text().encode())
        self._fd = fd
        return self

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "SnapshotLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_bytes(C: Mapping, snapshot_dir: Optional[os.PathLike] = None) -> int:
    """About the size of one checkpoint in bytes: the last one's when there is one, else
    float32 weights plus SGD momentum of the configured backbone."""
    if snapshot_dir is not None:
        last = Path(snapshot_dir) / "epoch-last.pth"
        if last.is_file():
            return last.stat().st_size
    return int(_PARAMS_M.get(C.get("backbone"), _PARAMS_M["resnet101"]) * 1e6 * 4 * 2)


def probe_folder(path: os.PathLike, key: str, need_bytes: int = 0) -> Optional[str]:
    """Create ``path`` if needed and check that a file can be written there; RunError names the
    folder, the cause and the config ``key`` to change. Returns a warning text (also logged)
    when the disk has less than ``need_bytes`` free, else None."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {key} folder {path}: {e.strerror or e}; set {key} to a "
                       f"writable folder (--set {key}=...)") from None
    if not path.is_dir():
        raise RunError(f"{key} {path} is not a folder; set {key} to a folder (--set {key}=...)")
    probe = path / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"probe")
    except OSError as e:
        raise RunError(f"{key} folder {path} is not writable ({e.strerror or e}); fix its "
                       f"permissions or set {key} to another folder (--set {key}=...)") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        msg = (f"{key} folder {path} has {free / 1e9:.2f} GB free, less than about two "
               f"checkpoints ({need_bytes / 1e9:.2f} GB); saves may fail: free space or set "
               f"{key} elsewhere")
        logger.warning(msg)
        return msg
    return None


@contextlib.contextmanager
def run_guard(C: Mapping, is_main: bool = True) -> Iterator[None]:
    """Around a training run on the writing process (rank 0): probe the log and snapshot
    folders, then hold the snapshot folder's lock until the run ends."""
    if not is_main:
        yield
        return
    need = 2 * checkpoint_bytes(C, C["snapshot_dir"])
    probe_folder(C["log_dir"], "log_dir")
    probe_folder(C["snapshot_dir"], "snapshot_dir", need)
    with SnapshotLock(C["snapshot_dir"]):
        # saves killed mid-write (SIGKILL) leave their temporaries; under the lock no other
        # training writes here, and a file of a live process is kept anyway
        from .checkpoint import remove_stale_temporaries
        remove_stale_temporaries(C["snapshot_dir"])
        yield
