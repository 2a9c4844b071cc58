"""The counter-based Gaussian noise of the compiled MALA kernel (rng.py)."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from thermo_ebm.samplers.rng import draw_key, normals_like, threefry2x64
from thermo_ebm.samplers.kernels import fold, mala_kernel

# Random123 known-answer vectors (tests/kat_vectors): rounds, counter (2 words), key (2 words), output (2 words)
KAT = [
    (13, "0000000000000000 0000000000000000", "0000000000000000 0000000000000000", "f167b032c3b480bd e91f9fee4b7a6fb5"),
    (13, "ffffffffffffffff ffffffffffffffff", "ffffffffffffffff ffffffffffffffff", "ccdec5c917a874b1 4df53abca26ceb01"),
    (13, "243f6a8885a308d3 13198a2e03707344", "a4093822299f31d0 082efa98ec4e6c89", "c3aac71561042993 3fe7ae8801aff316"),
    (20, "0000000000000000 0000000000000000", "0000000000000000 0000000000000000", "c2b6e3a8c2c69865 6f81ed42f350084d"),
    (20, "ffffffffffffffff ffffffffffffffff", "ffffffffffffffff ffffffffffffffff", "e02cb7c4d95d277a d06633d0893b8b68"),
    (20, "243f6a8885a308d3 13198a2e03707344", "a4093822299f31d0 082efa98ec4e6c89", "263c7d30bb0f0af1 56be8361d3311526"),
]


def _words(hexes):
    """uint64 hex words -> int64 0-d tensors (two's complement)."""
    return [torch.tensor(int(h, 16) - (1 << 64) if int(h, 16) >= 1 << 63 else int(h, 16)) for h in hexes.split()]


@pytest.mark.parametrize("rounds,ctr,key,want", KAT)
def test_threefry_matches_random123_known_answers(rounds, ctr, key, want):
    out = threefry2x64(*_words(ctr), *_words(key), rounds=rounds)
    assert [f"{int(w) & ((1 << 64) - 1):016x}" for w in out] == want.split()


def test_counter_normals_are_standard_normal():
    """1.6M draws: the moments, tail mass and the Kolmogorov-Smirnov distance of N(0, 1); the two members of a
    Box-Muller pair and neighbouring draws uncorrelated, also in their squares (a pair built from shared uniforms
    would fail the latter). Eager, which the next test ties to the compiled proposal's draws."""
    key = draw_key(torch.Generator().manual_seed(7), "cpu")
    z = normals_like(torch.empty(2048, 784), key).double().flatten().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(96 / n)
    tail = 2 * scipy.stats.norm.sf(3)
    assert abs(np.mean(np.abs(z) > 3) - tail) < 5 * math.sqrt(tail / n)
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    quarter = n // 4  # layout: [r cos, r sin] of word 0, then of word 1, each n / 4 long
    cos_, sin_ = z[:quarter], z[quarter:2 * quarter]
    for a, b in ((cos_, sin_), (cos_ ** 2, sin_ ** 2), (z[:-1], z[1:])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)


def test_compiled_proposal_draws_its_noise_from_a_fresh_key_per_step():
    """The compiled kernel hands `propose` a key drawn from the generator (reproducible, new every step), and
    the compiled proposal equals the eager one given the eager draws from that key, also when the number of
    coordinates is not a multiple of the 4 normals per Threefry block."""
    kernel = mala_kernel(True)
    x = torch.rand(300, 70, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grad, s, b = torch.randn(300, 70), torch.full((300, 1), 0.1), torch.ones(300, 1)
    g = torch.Generator().manual_seed(3)
    k1, k2 = kernel.noise(x, g), kernel.noise(x, g)
    assert k1.dtype == torch.int64 and k1.shape == (2,) and not torch.equal(k1, k2)
    assert torch.equal(k1, kernel.noise(x, torch.Generator().manual_seed(3)))
    y = kernel.propose(x, grad, s, b, k1)
    xi = normals_like(x, k1)
    assert abs(np.corrcoef(xi.flatten(), normals_like(x, k2).flatten())[0, 1]) < 5 / math.sqrt(x.numel())
    torch.testing.assert_close(y, fold(x + 0.5 * s * s * b * grad + s * xi), rtol=1e-5, atol=1e-5)


def test_noise_other_than_float32_cpu_is_torch_randn():
    like = torch.empty(5, 7, dtype=torch.float64)
    got = mala_kernel(True).noise(like, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
