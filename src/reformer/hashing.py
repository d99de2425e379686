"""Angular locality-sensitive hashing: random rotations, bucket ids, factorised buckets.

A vector x is hashed into one of n buckets by a random rotation R of shape (d, n/2):
bucket = argmax([xR, -xR]). Vectors at a small angle fall into the same bucket with high probability.
Several independent rotations give several hashing rounds.

Rotations are drawn from a ``torch.Generator`` of our own, on the CPU (so that CPU and GPU runs hash
alike), and never from the global RNG: hashing must not disturb dropout or data sampling, and must be
reproducible on its own.
"""

from __future__ import annotations

import math

import torch

from . import memory, native

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive integers over the seed space


def rotation_width(n_buckets: int | tuple[int, int]) -> int:
    """Columns of the rotation matrix: n/2 for n buckets, a/2 + b/2 for factorised buckets (a, b)."""
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    return sum(f // 2 for f in factors)


def draw_rotations(seed: int, n_heads: int, d_head: int, n_hashes: int,
                   n_buckets: int | tuple[int, int]) -> torch.Tensor:
    """Random rotations (n_heads, d_head, n_hashes, rotation_width) from a private generator.

    With the same seed this draws exactly what transformers draws after ``torch.manual_seed(seed)``
    (one rotation per head, float32 on the CPU), which is what makes its checkpoints hash alike here.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n_heads, d_head, n_hashes, rotation_width(n_buckets))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of the integers given (and differs when any differs).

    Seeds of training-time rotations are derive_seed(hash_seed, layer, call).
    """
    x = 0
    for part in parts:
        x = (x * _MIX + part + 1) % 2**64
    return x % 2**63


HASH_BLOCK_ELEMENTS = 1 << 20   # rotated values computed at once (4 MiB in float32: reused blocks, no page faults)
COMPILED_HASH_BLOCK_ELEMENTS = 1 << 22   # the same for the compiled pass, into one buffer (16 MiB)


def hash_vectors(vectors: torch.Tensor, rotations: torch.Tensor,
                 n_buckets: int | tuple[int, int]) -> torch.Tensor:
    """Bucket ids of every vector in every round.

    vectors: (batch, heads, length, d_head); rotations: (heads, d_head, n_hashes, rotation_width).
    Returns (batch, heads, n_hashes, length) int64 ids in [0, total buckets).
    Factorised buckets (a, b): hash into a and b buckets with separate columns, bucket = i + a * j.
    The rotated vectors (length x buckets / 2 per round and head) are formed a block of positions at a
    time: at 64K tokens and 2,048 buckets they would take 4 GiB at once.
    """
    batch, heads, length, _ = vectors.shape
    n_hashes = rotations.shape[2]
    if n_buckets == 1:
        return vectors.new_zeros((batch, heads, n_hashes, length), dtype=torch.long)
    rotations = rotations.to(vectors)
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    buckets = torch.empty((batch, heads, n_hashes, length), dtype=torch.long, device=vectors.device)
    vectors = vectors.detach()
    if native.supports(vectors) and not torch.is_autocast_enabled(vectors.device.type):
        _hash_compiled(vectors, rotations, factors, buckets)
        return buckets
    step = max(1, HASH_BLOCK_ELEMENTS // (batch * heads * n_hashes * rotations.shape[-1]))
    for start in range(0, length, step):
        rotated = torch.einsum("bhld,hdrk->bhrlk", vectors[:, :, start:start + step], rotations)
        ids, first, scale = None, 0, 1
        for factor in factors:
            part = rotated[..., first:first + factor // 2]
            # argmax over [xR, -xR], without building the concatenation
            top, top_index = part.max(dim=-1)
            bottom, bottom_index = part.min(dim=-1)
            factor_ids = torch.where(top >= -bottom, top_index, bottom_index + factor // 2)
            ids = factor_ids if ids is None else ids + scale * factor_ids
            first, scale = first + factor // 2, scale * factor
        buckets[..., start:start + step] = ids
    return buckets


def _hash_compiled(vectors: torch.Tensor, rotations: torch.Tensor, factors: tuple[int, ...],
                   buckets: torch.Tensor) -> None:
    """hash_vectors' ids through the compiled pass (native.hash_buckets: one pass over the rotated values
    instead of a max and a min per factor), rotating blocks of positions with one broadcast product into
    one reused buffer. (The einsum of the eager path rotates blocks 4x smaller into fresh tensors, through
    permuted copies: at 64K tokens 3-4x the time of these products. Both give the same values, bit for
    bit, on this machine's BLAS; tests/test_native.py holds the ids equal.)"""
    batch, heads, length, _ = vectors.shape
    _, _, n_hashes, width = rotations.shape
    step = max(1, min(length, COMPILED_HASH_BLOCK_ELEMENTS // (batch * heads * n_hashes * width)))
    flat_rotations = rotations.flatten(2)                                    # (heads, d, rounds * width)
    buffer = memory.empty((batch * heads * step * n_hashes * width,), vectors)
    for start in range(0, length, step):
        n = min(step, length - start)
        rotated = buffer[:batch * heads * n * n_hashes * width].view(batch, heads, n, n_hashes * width)
        torch.matmul(vectors[:, :, start:start + n], flat_rotations, out=rotated)
        native.hash_buckets(rotated.view(batch, heads, n, n_hashes, width).transpose(2, 3), factors,
                            buckets[..., start:start + n])


def total_buckets(n_buckets: int | tuple[int, int]) -> int:
    return math.prod(n_buckets) if isinstance(n_buckets, tuple) else n_buckets
