"""The normal fills used by the aleatoric loss: the compiled C loop, its torch fallback, the
chunking that makes results independent of the thread count, and the backend selection."""
import math
import os
import shutil

import numpy as np
import pytest
import torch

from furnace.losses import noise

NATIVE = noise.backend() == "native"
needs_native = pytest.mark.skipif(not NATIVE, reason="no C compiler: torch backend only")


@pytest.fixture
def fresh_backend(monkeypatch):
    """Forget the loaded backend for the test (restored afterwards)."""
    monkeypatch.setattr(noise, "_native", None)
    monkeypatch.setattr(noise, "_native_tried", False)
    return monkeypatch


def _fill(n, seed, threads, dtype=torch.float32):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        return noise.normal_(torch.empty(n, dtype=dtype), g), g
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- a numpy twin of noise.c
def _splitmix64(state):
    M = (1 << 64) - 1
    state = (state + 0x9E3779B97F4A7C15) & M
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return state, z ^ (z >> 31)


def _reference_fill(n, seed, lanes=16, pairs=256):
    """noise.c's algorithm as documented in its header, in numpy float32."""
    f32, u32 = np.float32, np.uint32
    s = np.zeros((4, lanes), dtype=u32)
    st = seed
    for ln in range(lanes):
        st, a = _splitmix64(st)
        st, b = _splitmix64(st)
        s[0, ln], s[1, ln] = a & 0xFFFFFFFF, a >> 32
        s[2, ln], s[3, ln] = b & 0xFFFFFFFF, (b >> 32) | 1

    def rotl(v, k):
        return (v << u32(k)) | (v >> u32(32 - k))

    out = []
    for _ in range(-(-n // (2 * pairs))):
        rows = []
        for _ in range(2 * pairs // lanes):           # one xoshiro128++ step of every lane
            a, b, c, d = s
            rows.append(rotl(a + d, 7) + a)
            t = b << u32(9)
            c = c ^ a
            d = d ^ b
            b = b ^ c
            a = a ^ d
            c = c ^ t
            d = rotl(d, 11)
            s = np.stack([a, b, c, d])
        w = np.concatenate(rows)
        wr, wa = w[:pairs], w[pairs:]
        # radius sqrt(-2 ln u)
        u = ((wr >> u32(1)).astype(np.int32).astype(f32) + f32(0.5)) * f32(1.0 / 2147483648.0)
        bits = u.view(u32)
        big = ((bits & u32(0x7FFFFF)) > u32(0x3504F3)).astype(u32)
        e = (bits >> u32(23)).astype(np.int32) - 127 + big.astype(np.int32)
        m = (((bits & u32(0x7FFFFF)) | u32(0x3F800000)) - (big << u32(23))).view(f32)
        sm = (m - f32(1)) / (m + f32(1))
        s2 = sm * sm
        p = f32(1) + s2 * (f32(1) / f32(3) + s2 * (f32(1) / f32(5) + s2 * (
            f32(1) / f32(7) + s2 * (f32(1) / f32(9)))))
        q = f32(-2) * (e.astype(f32) * f32(0.693147180559945) + f32(2) * sm * p)
        r = np.sqrt(np.maximum(q, f32(0)))
        # angle q pi/2 + x
        quad = wa >> u32(30)
        x = (((wa >> u32(6)) & u32(0xFFFFFF)).astype(np.int32).astype(f32)
             * f32(1.0 / 16777216.0) - f32(0.5)) * f32(1.5707963267948966)
        x2 = x * x
        sx = x * (f32(1) + x2 * (f32(-1) / f32(6) + x2 * (f32(1) / f32(120) + x2 * (
            f32(-1) / f32(5040) + x2 * (f32(1) / f32(362880))))))
        cx = f32(1) + x2 * (f32(-0.5) + x2 * (f32(1) / f32(24) + x2 * (f32(-1) / f32(720) + x2 * (
            f32(1) / f32(40320) + x2 * (f32(-1) / f32(3628800))))))
        odd = (quad & u32(1)).astype(bool)
        ca, sb = np.where(odd, sx, cx), np.where(odd, cx, sx)
        cos = (ca.view(u32) ^ (((quad ^ (quad >> u32(1))) & u32(1)) << u32(31))).view(f32)
        sin = (sb.view(u32) ^ ((quad >> u32(1)) << u32(31))).view(f32)
        out.append(np.concatenate([r * cos, r * sin]))
    return np.concatenate(out)[:n]


@needs_native
@pytest.mark.parametrize("n,seed", [(1, 0), (511, 7), (512, 2 ** 62 - 1), (1537, 123456789)])
def test_native_fill_matches_the_documented_algorithm_bit_for_bit(n, seed):
    fill = noise._native_fill()
    x = torch.full((n + 3,), 99.0)
    fill(x.data_ptr(), n, seed)
    with np.errstate(over="ignore"):             # uint32 wrap-around is the algorithm
        ref = _reference_fill(n, seed)
    assert np.array_equal(x[:n].numpy().view(np.uint32), ref.view(np.uint32))
    assert torch.all(x[n:] == 99.0)              # nothing written past n


@needs_native
def test_native_statistics_tails_and_no_serial_correlation():
    x, _ = _fill(8_000_000, 0, 2)
    y = x.double()
    assert torch.isfinite(y).all() and y.abs().max() < 6.67   # sqrt(64 ln 2)
    assert abs(y.mean().item()) < 1.5e-3                       # sd of the mean: 3.5e-4
    assert abs(y.std().item() - 1) < 1.5e-3
    assert abs((y ** 3).mean().item()) < 4e-3                  # sd 8.7e-4
    assert abs((y ** 4).mean().item() - 3) < 0.02
    for t in (1.0, 2.0, 3.0, 4.0):
        p = (y.abs() > t).double().mean().item()
        expect = math.erfc(t / math.sqrt(2))
        sd = math.sqrt(expect * (1 - expect) / y.numel())
        assert abs(p - expect) < 5 * sd, (t, p, expect)
    # neighbours (same lane pair, adjacent lanes, cos/sin partners 256 apart) are uncorrelated
    for lag in (1, 16, 256, 512):
        r = torch.corrcoef(torch.stack([y[:-lag], y[lag:]]))[0, 1].item()
        assert abs(r) < 2e-3, (lag, r)
    # and so are squares (Box-Muller partners share a radius: would show up here)
    y2 = y ** 2
    r = torch.corrcoef(torch.stack([y2[:-256], y2[256:]]))[0, 1].item()
    assert abs(r) < 2e-3, r


# --------------------------------------------------------------------------- both backends
@pytest.fixture(params=["native", "torch"])
def each_backend(request, fresh_backend):
    if request.param == "native" and not NATIVE:
        pytest.skip("no C compiler")
    fresh_backend.setenv("FURNACE_NOISE", request.param)
    assert noise.backend() == request.param
    return request.param


def test_same_numbers_for_any_thread_count(each_backend):
    n = noise.MIN_PARALLEL * 2 + 7          # not a multiple of CHUNKS: a short last chunk
    a, ga = _fill(n, 3, 1)
    b, gb = _fill(n, 3, 2)
    assert torch.equal(a, b)
    # the caller's generator advanced identically (by the seed draw only)
    assert torch.equal(ga.get_state(), gb.get_state())
    c, _ = _fill(n, 4, 2)
    assert not torch.equal(a, c)


def test_standard_normal_statistics_and_independent_chunks(each_backend):
    n = noise.MIN_PARALLEL * 4
    x, _ = _fill(n, 0, 2)
    assert torch.isfinite(x).all()
    assert abs(x.mean().item()) < 5e-3      # sd of the mean: 1e-3
    assert abs(x.std().item() - 1) < 5e-3
    assert abs((x ** 4).mean().item() - 3) < 0.05    # normal kurtosis
    step = -(-n // noise.CHUNKS)
    c0, c1 = x[:step], x[step:2 * step]
    assert abs(torch.corrcoef(torch.stack([c0, c1]))[0, 1].item()) < 0.01


def test_global_generator_reproducible(each_backend):
    for n in (1000, noise.MIN_PARALLEL):
        torch.manual_seed(11)
        a = noise.normal_(torch.empty(n))
        torch.manual_seed(11)
        b = noise.normal_(torch.empty(n))
        assert torch.equal(a, b)
        assert not torch.equal(a, noise.normal_(torch.empty(n)))


def test_float64_and_strided_tensors_use_torch_draws(each_backend):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    small = noise.normal_(torch.empty(1000, dtype=torch.float64), g1)
    assert torch.equal(small, torch.empty(1000, dtype=torch.float64).normal_(generator=g2))
    big = torch.empty(2, noise.MIN_PARALLEL)
    g1.manual_seed(6), g2.manual_seed(6)
    noise.normal_(big.t(), g1)              # not contiguous: one plain fill
    ref = torch.empty(2, noise.MIN_PARALLEL).t().normal_(generator=g2)
    assert torch.equal(big.t(), ref)
    x, _ = _fill(noise.MIN_PARALLEL, 1, 2, torch.float64)    # large float64: chunked torch
    assert x.dtype == torch.float64 and abs(x.std().item() - 1) < 1e-2


def test_small_float32_fill(each_backend):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    small = noise.normal_(torch.empty(1000), g1)
    plain = torch.empty(1000).normal_(generator=g2)
    # torch backend: a plain normal_; native: one C chunk seeded from the generator
    assert torch.equal(small, plain) == (each_backend == "torch")
    assert noise.normal_(torch.empty(0)).numel() == 0


# --------------------------------------------------------------------------- backend selection
def test_bad_mode_names_the_variable(fresh_backend):
    fresh_backend.setenv("FURNACE_NOISE", "fast")
    with pytest.raises(ValueError, match="FURNACE_NOISE='fast'.*'auto', 'native' or 'torch'"):
        noise.backend()


def test_no_compiler_auto_warns_and_falls_back(fresh_backend):
    fresh_backend.setenv("FURNACE_NOISE", "auto")
    fresh_backend.setattr(noise, "_compilers", lambda: [])
    with pytest.warns(RuntimeWarning, match="torch's normal_.*no C compiler found"):
        assert noise.backend() == "torch"
    x, _ = _fill(noise.MIN_PARALLEL, 0, 1)
    assert abs(x.std().item() - 1) < 1e-2


def test_no_compiler_native_mode_is_an_error(fresh_backend):
    fresh_backend.setenv("FURNACE_NOISE", "native")
    fresh_backend.setattr(noise, "_compilers", lambda: [])
    with pytest.raises(RuntimeError, match="(?s)FURNACE_NOISE=native: no C compiler found.*"
                                           "FURNACE_NOISE=auto"):
        noise.backend()


def test_broken_compiler_reports_its_output(fresh_backend, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc: cannot do that' >&2\nexit 1\n")
    fake.chmod(0o755)
    fresh_backend.setenv("FURNACE_NOISE", "native")
    fresh_backend.setenv("FURNACE_CACHE_DIR", str(tmp_path / "cache"))
    fresh_backend.setattr(noise, "_compilers", lambda: [[str(fake)]])
    with pytest.raises(RuntimeError, match="(?s)could not compile .*noise.c.*fakecc: cannot do that"):
        noise.backend()
    assert not any((tmp_path / "cache").iterdir())           # no partial library left behind


def test_compiler_from_cc_keeps_its_arguments(monkeypatch, tmp_path):
    fake = tmp_path / "wrapcc"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", f"{fake} --target=x")
    monkeypatch.setenv("PATH", str(tmp_path))            # no cc, gcc or clang besides it
    assert noise._compilers() == [[str(fake), "--target=x"]]
    monkeypatch.setenv("CC", "no-such-compiler")
    assert noise._compilers() == []


@needs_native
def test_build_is_cached_per_source(fresh_backend, tmp_path):
    fresh_backend.setenv("FURNACE_CACHE_DIR", str(tmp_path))
    lib = noise._build()
    assert lib.parent == tmp_path and lib.suffix == ".so"
    stamp = os.stat(lib).st_mtime_ns
    assert noise._build() == lib and os.stat(lib).st_mtime_ns == stamp    # reused
    src = tmp_path / "noise.c"                                # another source: another file
    shutil.copy(noise._SOURCE, src)
    with open(src, "a") as f:
        f.write("\n/* changed */\n")
    fresh_backend.setattr(noise, "_SOURCE", src)
    other = noise._build()
    assert other != lib and other.exists()
