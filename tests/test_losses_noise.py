"""The normal fills used by the aleatoric loss: chunking makes results independent of the
thread count; small, strided and float64 fills are plain torch draws."""
import torch

from furnace.losses import noise


def _fill(n, seed, threads, dtype=torch.float32):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        return noise.normal_(torch.empty(n, dtype=dtype), g), g
    finally:
        torch.set_num_threads(old)


def test_same_numbers_for_any_thread_count():
    n = noise.MIN_PARALLEL * 2 + 7          # not a multiple of CHUNKS: a short last chunk
    a, ga = _fill(n, 3, 1)
    b, gb = _fill(n, 3, 2)
    assert torch.equal(a, b)
    # the caller's generator advanced identically (by the seed draw only)
    assert torch.equal(ga.get_state(), gb.get_state())
    c, _ = _fill(n, 4, 2)
    assert not torch.equal(a, c)


def test_chunks_are_seeded_torch_streams():
    """The stream is defined by torch alone: chunk k is normal_ from seed k of the caller's
    generator (the same numbers on every machine with this torch)."""
    n = noise.MIN_PARALLEL * 2
    x, _ = _fill(n, 9, 2)
    seeds = torch.randint(0, 2 ** 62, (noise.CHUNKS,), generator=torch.Generator().manual_seed(9),
                          dtype=torch.int64).tolist()
    step = -(-n // noise.CHUNKS)
    for k in (0, noise.CHUNKS - 1):
        want = torch.empty(len(x[k * step:(k + 1) * step])).normal_(
            generator=torch.Generator().manual_seed(seeds[k]))
        assert torch.equal(x[k * step:(k + 1) * step], want)


def test_standard_normal_statistics_and_independent_chunks():
    n = noise.MIN_PARALLEL * 4
    x, _ = _fill(n, 0, 2)
    assert torch.isfinite(x).all()
    assert abs(x.mean().item()) < 5e-3      # sd of the mean: 1e-3
    assert abs(x.std().item() - 1) < 5e-3
    assert abs((x ** 4).mean().item() - 3) < 0.05    # normal kurtosis
    step = -(-n // noise.CHUNKS)
    c0, c1 = x[:step], x[step:2 * step]
    assert abs(torch.corrcoef(torch.stack([c0, c1]))[0, 1].item()) < 0.01


def test_global_generator_reproducible():
    for n in (1000, noise.MIN_PARALLEL):
        torch.manual_seed(11)
        a = noise.normal_(torch.empty(n))
        torch.manual_seed(11)
        b = noise.normal_(torch.empty(n))
        assert torch.equal(a, b)
        assert not torch.equal(a, noise.normal_(torch.empty(n)))


def test_small_float64_and_strided_tensors_use_plain_draws():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    small = noise.normal_(torch.empty(1000, dtype=torch.float64), g1)
    assert torch.equal(small, torch.empty(1000, dtype=torch.float64).normal_(generator=g2))
    small = noise.normal_(torch.empty(1000), g1)
    assert torch.equal(small, torch.empty(1000).normal_(generator=g2))
    big = torch.empty(2, noise.MIN_PARALLEL)
    g1.manual_seed(6), g2.manual_seed(6)
    noise.normal_(big.t(), g1)              # not contiguous: one plain fill
    ref = torch.empty(2, noise.MIN_PARALLEL).t().normal_(generator=g2)
    assert torch.equal(big.t(), ref)
    x, _ = _fill(noise.MIN_PARALLEL, 1, 2, torch.float64)    # large float64: chunked
    assert x.dtype == torch.float64 and abs(x.std().item() - 1) < 1e-2
    assert noise.normal_(torch.empty(0)).numel() == 0
