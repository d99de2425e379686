"""Angular locality-sensitive hashing: random rotations, bucket ids, factorised buckets.

A vector x is hashed into one of n buckets by a random rotation R of shape (d, n/2):
bucket = argmax([xR, -xR]). Vectors at a small angle fall into the same bucket with high probability.
Several independent rotations give several hashing rounds.

Rotations are drawn from a ``torch.Generator`` of our own, on the CPU (so that CPU and GPU runs hash
alike), and never from the global RNG: hashing must not disturb dropout or data sampling, and must be
reproducible on its own. ``lsh_rotations`` is that draw as a torch operator, so that torch.compile traces
through it (a generator cannot be made inside a compiled region). Hashing runs in float32 whatever the
model's dtype (float64 stays float64): in bfloat16, rounding moves items across bucket boundaries, and a
forward pass and cached decoding, which round in different orders, would disagree (``hashing_vectors``).
"""

from __future__ import annotations

import math

import torch

from . import memory
from .native import kernels as native
from .registry import operator

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive integers over the seed space
SEED_LIMIT = 2**63         # seeds are int64 (torch operators take no wider integers)


def rotation_width(n_buckets: int | tuple[int, int]) -> int:
    """Columns of the rotation matrix: n/2 for n buckets, a/2 + b/2 for factorised buckets (a, b)."""
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    return sum(f // 2 for f in factors)


def total_buckets(n_buckets: int | tuple[int, int]) -> int:
    return math.prod(n_buckets) if isinstance(n_buckets, tuple) else n_buckets


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of the integers given (and differs when any differs).

    Seeds of training-time rotations are derive_seed(hash_seed, layer, call).
    """
    x = 0
    for part in parts:
        x = (x * _MIX + part + 1) % 2**64
    return x % 2**63


def draw_rotations(seed: int, n_heads: int, d_head: int, n_hashes: int,
                   n_buckets: int | tuple[int, int]) -> torch.Tensor:
    """Random rotations (n_heads, d_head, n_hashes, rotation_width) from a private generator.

    With the same seed this draws exactly what transformers draws after ``torch.manual_seed(seed)``
    (one rotation per head, float32 on the CPU), which is what makes its checkpoints hash alike here.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n_heads, d_head, n_hashes, rotation_width(n_buckets))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@operator
def lsh_rotations(calls: torch.Tensor | None, hash_seed: int, layer: int, n_heads: int, d_head: int,
                  n_hashes: int, width: int, device: torch.device) -> torch.Tensor:
    """Rotations (n_heads, d_head, n_hashes, width) in float32 on ``device``, drawn on the CPU: of call
    number ``calls`` (a CPU int64 scalar) of layer ``layer`` in training, from derive_seed(hash_seed, layer,
    calls); of hash_seed alone when ``calls`` is None (evaluation). A CUDA copy goes from pinned memory
    without waiting: no host synchronisation per layer."""
    seed = hash_seed if calls is None else derive_seed(hash_seed, layer, int(calls))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rotations = torch.randn((n_heads, d_head, n_hashes, width), generator=generator, dtype=torch.float32)
    if device.type == "cuda":
        return rotations.pin_memory().to(device, non_blocking=True)
    return rotations.to(device)


@torch.library.register_fake(lsh_rotations)
def _(calls, hash_seed, layer, n_heads, d_head, n_hashes, width, device):
    return torch.empty((n_heads, d_head, n_hashes, width), dtype=torch.float32, device=device)


HASH_BLOCK_ELEMENTS = 1 << 20   # rotated values computed at once (4 MiB in float32: reused blocks, no page faults)
COMPILED_HASH_BLOCK_ELEMENTS = 1 << 22   # the same for the compiled pass, into one buffer (16 MiB)


def hash_vectors(vectors: torch.Tensor, rotations: torch.Tensor, n_buckets: int | tuple[int, int],
                 compiled: bool = False) -> torch.Tensor:
    """Bucket ids of every vector in every round.

    vectors: (batch, heads, length, d_head); rotations: (heads, d_head, n_hashes, rotation_width).
    Returns (batch, heads, n_hashes, length) int64 ids in [0, total buckets).
    Factorised buckets (a, b): hash into a and b buckets with separate columns, bucket = i + a * j.
    The rotated vectors (length x buckets / 2 per round and head) are formed a block of positions at a
    time: at 64K tokens and 2,048 buckets they would take 4 GiB at once. ``compiled``: the argmax through
    the compiled pass (CPU, float32 or float64; the "native" backend), which gives the same ids.
    """
    batch, heads, length, _ = vectors.shape
    n_hashes = rotations.shape[2]
    if n_buckets == 1:
        return vectors.new_zeros((batch, heads, n_hashes, length), dtype=torch.long)
    vectors = vectors.detach()
    if vectors.dtype != torch.float64:
        vectors = vectors.float()
    rotations = rotations.to(vectors)
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    buckets = torch.empty((batch, heads, n_hashes, length), dtype=torch.long, device=vectors.device)
    with torch.autocast(vectors.device.type, enabled=False):   # the rotation in the vectors' dtype
        if compiled:
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
    """hash_vectors' ids through the compiled pass (one pass over the rotated values instead of a max and
    a min per factor), rotating blocks of positions with one broadcast product into one reused buffer
    (the einsum of the eager path rotates into fresh tensors, through permuted copies). Both give the
    same values, bit for bit, on this machine's BLAS; tests/test_native.py holds the ids equal."""
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


def hashing_vectors(qk: torch.Tensor, h: torch.Tensor, w_qk: torch.Tensor) -> torch.Tensor:
    """The vectors LSH hashes: the queries qk (batch, heads, length, d) where they are float32 or float64;
    16-bit queries (autocast, or a half-precision model) are projected again from h (batch, length, d_model)
    with w_qk (heads * d, d_model) in float32. A 16-bit rounding of the queries would decide buckets near
    their boundaries, and differently in a full forward and in cached decoding, which project alike but
    round apart."""
    if qk.dtype in (torch.float32, torch.float64):
        return qk
    with torch.autocast(h.device.type, enabled=False):
        projected = torch.nn.functional.linear(h.float(), w_qk.float())
    return projected.view(*h.shape[:2], qk.shape[1], -1).transpose(1, 2)


def hash_with_padding(qk: torch.Tensor, rotations: torch.Tensor, n_buckets: int | tuple[int, int],
                      key_valid: torch.Tensor | None) -> torch.Tensor:
    """Bucket ids (batch, heads, rounds, length), unique across rounds, padding in an extra last bucket
    (``with_padding`` of ``hash_vectors``)."""
    return with_padding(hash_vectors(qk, rotations, n_buckets), n_buckets, key_valid)


def with_padding(buckets: torch.Tensor, n_buckets: int | tuple[int, int], key_valid: torch.Tensor | None
                 ) -> torch.Tensor:
    """Bucket ids (batch, heads, rounds, length) made unique across rounds, padding in an extra last bucket.

    Round r uses ids r * (B + 1) ... r * (B + 1) + B, where B is the number of buckets and id B of a
    round is padding: padding then sorts after every real item of its round and never shares a bucket
    with one, so it neither takes band slots of real queries nor shifts them.
    """
    n = total_buckets(n_buckets)
    if key_valid is not None:
        buckets = buckets.masked_fill(~key_valid[:, None, None, :], n)
    offsets = torch.arange(buckets.shape[2], device=buckets.device)[:, None] * (n + 1)
    return buckets + offsets
