"""Counter-based Gaussian noise for CPU sampling.

torch.randn on CPU fills from one mt19937 stream on one core: at d = 784, N = 1024 it costs 0.12 of the
network's forward + input-gradient time per sampler step (docs/performance.md). Here the noise comes from
Threefry-2x64-20 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; the Random123 default
round count) applied to counters 0, 1, 2, ... under a fresh 128-bit key drawn from the caller's explicit
torch.Generator, then Box-Muller. Every output depends only on (key, counter), so torch.compile turns it
into parallel, vectorised code inside the loop that consumes the noise (the compiled MALA proposal in
sampling.py), with no [N, D] noise tensor in memory. Eager it is ~15x slower than torch.randn, so the
samplers use it only compiled. Integers are int64 with two's-complement wrap-around, i.e. uint64
arithmetic bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch

def stream_seed(*keys: int) -> int:
    """A 63-bit seed for one random stream named by non-negative integers (seed, stream, rank, restart, ...),
    through numpy's SeedSequence: distinct key tuples give independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


ROTATIONS = (16, 42, 12, 31, 16, 32, 24, 21)  # Threefry-2x64 rotation constants
PARITY = 0x1BD11BDAA9FC1A22                   # Skein key-schedule parity constant (< 2^63: a valid int64)
ROUNDS = 20


def _rotl(x, r: int):
    """Rotate int64 words left by r bits (logical right shift by masking off the sign extension)."""
    return (x << r) | ((x >> (64 - r)) & ((1 << r) - 1))


def threefry2x64(c0, c1, k0, k1, rounds: int = ROUNDS):
    """Threefry-2x64 block function: counters c0, c1 (int64 tensors, any shape) under key (k0, k1) (int64
    0-d tensors) -> two int64 tensors of random words (Random123 known-answer vectors in tests/test_rng.py)."""
    k2 = k0 ^ k1 ^ PARITY
    ks = (k0, k1, k2)
    x0, x1 = c0 + k0, c1 + k1
    for r in range(rounds):
        x0 = x0 + x1
        x1 = _rotl(x1, ROTATIONS[r % 8]) ^ x0
        if r % 4 == 3:  # key injection every four rounds
            i = (r + 1) // 4
            x0 = x0 + ks[i % 3]
            x1 = x1 + ks[(i + 1) % 3] + i
    return x0, x1


def normals_from_key(n_blocks: int, key):
    """4 * n_blocks float32 standard normals from counters 0 .. n_blocks-1 under key (int64 [2]): each 64-bit
    word gives two 24-bit uniforms in (0, 1) (u = (k + 1/2) 2^-24) and Box-Muller turns each pair into two
    normals (largest |z| 5.9, as for torch.randn's 24-bit float32 uniforms)."""
    c0 = torch.arange(n_blocks, dtype=torch.int64, device=key.device)
    words = threefry2x64(c0, torch.zeros_like(c0), key[0], key[1])
    out = []
    for w in words:
        u1 = ((w & 0xFFFFFF).to(torch.int32).float() + 0.5) * 2.0 ** -24
        u2 = (((w >> 32) & 0xFFFFFF).to(torch.int32).float() + 0.5) * 2.0 ** -24
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = (2.0 * math.pi) * u2
        out += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.cat(out)


def draw_key(generator, device) -> torch.Tensor:
    """A fresh 128-bit Threefry key (int64 [2]) from the caller's generator."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (2,), generator=generator, device=device, dtype=torch.int64)


def normals_like(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Standard normals shaped like `like` (float32) from counters 0, 1, ... under `key` (int64 [2])."""
    n = like.numel()
    return normals_from_key(-(-n // 4), key)[:n].reshape(like.shape)
