"""The chunked, multi-threaded normal fill used by the aleatoric loss."""
import torch

from furnace.losses import noise


def _fill(n, seed, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        return noise.normal_(torch.empty(n), g), g
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


def test_small_or_strided_tensors_use_plain_normal():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    small = noise.normal_(torch.empty(1000), g1)
    assert torch.equal(small, torch.empty(1000).normal_(generator=g2))
    big = torch.empty(2, noise.MIN_PARALLEL)
    g1.manual_seed(6), g2.manual_seed(6)
    noise.normal_(big.t(), g1)              # not contiguous: one plain fill
    ref = torch.empty(2, noise.MIN_PARALLEL).t().normal_(generator=g2)
    assert torch.equal(big.t(), ref)


def test_global_generator_reproducible():
    torch.manual_seed(11)
    a = noise.normal_(torch.empty(noise.MIN_PARALLEL))
    torch.manual_seed(11)
    b = noise.normal_(torch.empty(noise.MIN_PARALLEL))
    assert torch.equal(a, b)
