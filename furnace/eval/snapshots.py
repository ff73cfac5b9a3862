"""Which checkpoints ``eval.py -e`` means (REFERENCE 5.2, with QUIRK 30 fixed).

Forms of the spec:
  ``path/to/file.pth``  that file (relative to the current directory, or absolute);
  ``N``                 ``<snapshot_dir>/epoch-N.pth``;
  ``a-b``               every ``epoch-N.pth`` with a <= N <= b (a == b allowed), in epoch order;
  ``a-``                every ``epoch-N.pth`` with N >= a, in epoch order;
  ``last``              ``<snapshot_dir>/epoch-last.pth``.
Other files in the snapshot folder are ignored. A missing checkpoint, an empty range or a
malformed spec raises FileNotFoundError / ValueError naming the spec and the epochs available.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Union

from furnace.engine.checkpoint import CHECKPOINT_RE

PathLike = Union[str, os.PathLike]
_RANGE_RE = re.compile(r"^(\d+)-(\d*)$")


def available_epochs(snapshot_dir: PathLike) -> List[int]:
    """Sorted epoch numbers N of the ``epoch-N.pth`` files in ``snapshot_dir`` ([] if none)."""
    try:
        names = os.listdir(snapshot_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.match, names)
                  if m and os.path.isfile(os.path.join(snapshot_dir, m.group(0))))


def _available_text(snapshot_dir: PathLike) -> str:
    epochs = available_epochs(snapshot_dir)
    if not os.path.isdir(snapshot_dir):
        return f"the snapshot folder {snapshot_dir} does not exist"
    last = os.path.isfile(os.path.join(snapshot_dir, "epoch-last.pth"))
    if not epochs and not last:
        return f"no epoch-N.pth checkpoints in {snapshot_dir}"
    listed = ", ".join(map(str, epochs)) if epochs else "none"
    return f"epochs available in {snapshot_dir}: {listed}" + (" (and last)" if last else "")


def checkpoint_epoch(path: PathLike) -> Optional[int]:
    """The epoch N of an ``epoch-N.pth`` file name, else None (e.g. ``epoch-last.pth``)."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def resolve_checkpoints(spec: str, snapshot_dir: PathLike) -> List[Path]:
    """The checkpoint files selected by ``-e spec`` (see the module doc), in evaluation order.

    Raises ValueError for a malformed spec or a range with a > b, FileNotFoundError for a
    missing file or a range that selects nothing; messages name the spec and list the epochs.
    """
    spec = str(spec).strip()
    snapshot_dir = Path(snapshot_dir)
    if not spec:
        raise ValueError("empty -e/--epochs; use an epoch N, a range a-b or a-, 'last', "
                         "or a .pth path")
    if spec.endswith(".pth"):
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        if not path.is_file():
            raise FileNotFoundError(f"-e {spec}: checkpoint not found: {path} "
                                    f"({_available_text(snapshot_dir)})")
        return [path]
    if spec == "last" or spec.isdigit():
        name = "epoch-last.pth" if spec == "last" else f"epoch-{int(spec)}.pth"
        path = snapshot_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"-e {spec}: checkpoint not found: {path} "
                                    f"({_available_text(snapshot_dir)})")
        return [path]
    m = _RANGE_RE.match(spec)
    if not m:
        raise ValueError(f"-e {spec!r} is not understood; use an epoch N, a range a-b "
                         f"(inclusive) or a- (open), 'last', or a path ending in .pth")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else None
    if hi is not None and lo > hi:
        raise ValueError(f"-e {spec}: the range start {lo} is after its end {hi}; "
                         f"write {hi}-{lo}")
    if not snapshot_dir.is_dir():
        raise FileNotFoundError(f"-e {spec}: the snapshot folder {snapshot_dir} does not exist "
                                "(set snapshot_dir, or the env var snapshot_dir)")
    epochs = [n for n in available_epochs(snapshot_dir) if n >= lo and (hi is None or n <= hi)]
    if not epochs:
        raise FileNotFoundError(f"-e {spec}: no checkpoint in this range; "
                                f"{_available_text(snapshot_dir)}")
    return [snapshot_dir / f"epoch-{n}.pth" for n in epochs]
