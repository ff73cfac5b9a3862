"""Standard normal fills for the aleatoric loss's Monte Carlo noise.

On CPU the T noise draws are the largest share of the aleatoric loss's time.  torch's CPU
``normal_`` is scalar (mt19937 + Box-Muller) and runs on one thread, so large CPU fills go
through :func:`normal_` here, which

* cuts the tensor into ``CHUNKS`` fixed chunks, each with its own 62-bit seed drawn from the
  caller's torch generator, and fills the chunks concurrently on up to
  ``torch.get_num_threads()`` threads: the numbers depend on the generator state only, never on
  the thread count;
* fills each float32 chunk with a small C loop (``noise.c``: 16 xoshiro128++ streams and a
  vectorised Box-Muller, about 5x faster than ``normal_`` on one core), compiled with the
  system's C compiler on first use and cached (``FURNACE_CACHE_DIR``, default
  ``~/.cache/furnace``).  Where no compiler is found, or for other dtypes, each chunk is a
  ``normal_`` with its own ``torch.Generator`` (one warning says so).

``FURNACE_NOISE`` chooses: ``auto`` (default; C if it builds, else torch), ``native`` (C, or an
error saying why it cannot be built) or ``torch``.  Both backends draw i.i.d. N(0, 1) numbers;
they are different streams, so a run is reproducible for a given seed and backend.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["normal_", "backend", "CHUNKS", "MIN_PARALLEL"]

#: chunks per large fill (fixed, so results do not depend on the thread count)
CHUNKS = 8
#: below this many elements a fill is one chunk on the calling thread (a hand-off costs ~0.1 ms)
MIN_PARALLEL = 1 << 18

_SOURCE = Path(__file__).with_name("noise.c")
_BASE_FLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]

_pool: Optional[ThreadPoolExecutor] = None
_pool_key = None
_lock = threading.Lock()
_native: Optional[Callable] = None
_native_tried = False


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads (rebuilt after fork or a thread-count change:
    a pool inherited through fork has no threads behind it)."""
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _lock:
        if _pool_key != key:
            if _pool is not None and _pool_key[0] == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="furnace-normal")
            _pool_key = key
        return _pool


# --------------------------------------------------------------------------- the C backend
def _mode() -> str:
    mode = os.environ.get("FURNACE_NOISE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "native", "torch"):
        raise ValueError(f"FURNACE_NOISE={mode!r}: expected 'auto', 'native' or 'torch'")
    return mode


def _cache_dir() -> Path:
    """``FURNACE_CACHE_DIR``, else ``$XDG_CACHE_HOME/furnace`` or ``~/.cache/furnace``; a
    per-user temporary folder when that cannot be created."""
    if os.environ.get("FURNACE_CACHE_DIR"):
        path = Path(os.environ["FURNACE_CACHE_DIR"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "furnace"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        user = os.getuid() if hasattr(os, "getuid") else "user"
        path = Path(tempfile.gettempdir()) / f"furnace-{user}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_id() -> str:
    """Identifies the CPU for the cache key (builds may use -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compilers() -> list:
    """Compiler commands to try, each a list of arguments: $CC (may carry arguments, e.g.
    ``ccache gcc``), then cc, gcc and clang as found on PATH."""
    found = []
    cc_env = shlex.split(os.environ.get("CC", ""))
    if cc_env and shutil.which(cc_env[0]):
        found.append([shutil.which(cc_env[0]), *cc_env[1:]])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path and [path] not in found:
            found.append([path])
    return found


def _build() -> Path:
    """Compile noise.c into the cache (once per source, compiler and CPU); returns the path.

    Raises RuntimeError with the compiler output when no compiler is found or none succeeds.
    """
    src = _SOURCE.read_bytes()
    compilers = _compilers()
    if not compilers:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    cache = _cache_dir()
    target = b"\0".join([src, platform.machine().encode(), _cpu_id().encode()])
    errors = []
    for cc in compilers:
        for march in (["-march=native"], []):
            flags = _BASE_FLAGS + march
            cmd = " ".join(cc + flags)
            key = hashlib.sha256(target + b"\0" + cmd.encode()).hexdigest()[:16]
            lib = cache / f"noise-{key}.so"
            if lib.exists():
                return lib
            # compile to a private name, then rename: concurrent ranks never see half a file
            tmp = cache / f".noise-{key}-{os.getpid()}-{threading.get_ident()}.so"
            try:
                r = subprocess.run([*cc, *flags, "-o", str(tmp), str(_SOURCE)],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode == 0 and tmp.exists():
                    os.replace(tmp, lib)
                    return lib
                errors.append(f"{cmd}: {r.stderr.strip()[-500:]}")
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{cmd}: {e}")
            finally:
                if tmp.exists():
                    tmp.unlink()
    raise RuntimeError("could not compile " + str(_SOURCE) + ":\n" + "\n".join(errors))


def _load() -> Callable:
    """The C fill function ``fill(ptr, n, seed)``, built if needed (RuntimeError if not)."""
    # the cache key covers the source, so a loaded library always matches noise.c
    lib = ctypes.CDLL(str(_build()))           # ctypes releases the GIL during calls
    fill = lib.furnace_normal_fill
    fill.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]
    fill.restype = None
    # cheap guard against a broken build: finite, roughly standard numbers
    probe = torch.empty(4096)
    fill(probe.data_ptr(), probe.numel(), 1)
    if not (torch.isfinite(probe).all() and abs(probe.mean().item()) < 0.2
            and 0.8 < probe.std().item() < 1.2):
        raise RuntimeError(f"{_SOURCE}: the compiled fill gives implausible numbers")
    return fill


def _native_fill() -> Optional[Callable]:
    """The C fill function, or None when ``FURNACE_NOISE=torch`` or it cannot be built."""
    global _native, _native_tried
    if _native_tried:
        return _native
    mode = _mode()
    with _lock:
        if not _native_tried:
            if mode != "torch":
                try:
                    _native = _load()
                except (OSError, RuntimeError) as e:
                    if mode == "native":
                        raise RuntimeError(f"FURNACE_NOISE=native: {e}\nInstall a C compiler "
                                           "(gcc or clang) or set FURNACE_NOISE=auto.") from e
                    warnings.warn(f"furnace.losses.noise: using torch's normal_ for the "
                                  f"aleatoric noise (slower on CPU): {e}", RuntimeWarning,
                                  stacklevel=3)
            _native_tried = True
    return _native


def backend() -> str:
    """``'native'`` when CPU float32 fills use the compiled C loop, else ``'torch'``."""
    return "native" if _native_fill() is not None else "torch"


# --------------------------------------------------------------------------- the fill
def normal_(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``x`` in place with i.i.d. N(0, 1) numbers; returns ``x``.

    Contiguous CPU tensors take their numbers from seeds drawn from ``generator`` (default:
    torch's global CPU generator): one chunk below ``MIN_PARALLEL`` elements, ``CHUNKS``
    chunks (filled concurrently) above; float32 chunks use the C loop when it is available.
    Other tensors (CUDA, strided) are ``x.normal_(generator=generator)``, as are small
    non-float32 ones.  Reproducible under ``torch.manual_seed`` / ``generator.manual_seed`` and
    independent of the thread count.
    """
    n = x.numel()
    if x.device.type != "cpu" or not x.is_contiguous() or n == 0:
        return x.normal_(generator=generator)
    fast = _native_fill() if x.dtype == torch.float32 else None
    if fast is None and n < MIN_PARALLEL:
        return x.normal_(generator=generator)
    chunks = CHUNKS if n >= MIN_PARALLEL else 1
    # 62-bit seeds from the caller's stream: one small draw advances it deterministically
    seeds = torch.randint(0, 2 ** 62, (chunks,), generator=generator, dtype=torch.int64).tolist()
    flat = x.view(-1)
    step = -(-n // chunks)

    def fill(k: int) -> None:
        part = flat[k * step:(k + 1) * step]
        if fast is not None:
            fast(part.data_ptr(), part.numel(), seeds[k])
        else:
            part.normal_(generator=torch.Generator().manual_seed(seeds[k]))

    workers = min(chunks, torch.get_num_threads())
    if workers <= 1:
        for k in range(chunks):
            fill(k)
    else:
        list(_executor(workers).map(fill, range(chunks)))
    return x
