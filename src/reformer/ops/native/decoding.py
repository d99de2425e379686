"""Cached decoding's attention steps through decode.c, for LSH and local layers: per layer and token the
projection, one call that does the rest (for LSH: the key, the hashing, the attention over every round's
bucket and the ring updates), and the output projection, in place of some ten (local) to thirty (LSH)
torch operations that each cost more in dispatch than in arithmetic. caches.LSHCache and LocalCache
hold the state (their eager steps are the reference, tests/test_generate.py) and hand it here after
prefill where the compiled core serves: on the CPU, in float32 or float64.
"""

from __future__ import annotations

import ctypes

import torch

from .kernels import DecodeCall, LocalDecodeCall, _kernel


class _Step:
    """What both steps share: the projection into a buffer, room for the new row in the cache, one call,
    the output projection. step(h (batch, d_model)) -> (batch, d_model)."""

    def __init__(self, cache, batch: int, weight: torch.Tensor, call: ctypes.Structure, kernel: str):
        self.cache, self.batch, self.weight = cache, batch, weight
        self.features = weight.shape[0]
        self.call, self.storage = call, None
        self.function, self.arguments = _kernel(kernel, weight.dtype), ctypes.byref(call)

    def place(self, position: int) -> None:
        self.call.position = position

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape != (self.batch, self.features) or h.dtype != self.weight.dtype:
            raise ValueError(f"the decoder was filled for {self.batch} rows of {self.features} {self.weight.dtype} "
                             f"features, got {tuple(h.shape)} {h.dtype}")
        torch.mm(h, self.weight, out=self.projected)
        rows = self.cache.key_values
        storage = rows.reserve(1)
        if storage is not self.storage:   # the storage grew: new address and capacity
            self.storage, self.call.cache, self.call.capacity = storage, storage.data_ptr(), storage.shape[2]
        self.place(rows.length)
        self.function(self.arguments)
        rows.length += 1
        return torch.mm(self.out, self.cache.out_weight)


def _buffers(weight: torch.Tensor, batch: int, heads: int, d: int, scratch: int):
    """The projection's output, the attention's output and the scores' scratch, reused every step."""
    return weight.new_empty(batch, weight.shape[1]), weight.new_empty(batch, heads * d), weight.new_empty(scratch)


class LSHStep(_Step):
    """The attention step of ``cache`` (a caches.LSHCache after prefill) for ``batch`` rows."""

    def __init__(self, cache, batch: int):
        heads, d, window = cache.n_heads, cache.d_head, cache.window
        rounds, factors = cache.rotations.shape[2], cache.factors
        weight = cache.step_weight
        self.projected, self.out, self.scores = _buffers(weight, batch, heads, d, rounds * window)
        self.rows = torch.empty(rounds * window + rounds, dtype=torch.long)
        self.rotated = weight.new_empty(rounds * sum(factors))
        self.hash = cache.hash_matrix.to(weight.dtype).contiguous()   # (heads, d, rounds * sum(factors))
        one_bucket = cache.n_buckets == 1
        call = DecodeCall(
            batch=batch, heads=heads, d=d, rounds=rounds, width=sum(factors),
            n_factors=0 if one_bucket else len(factors), factors=(ctypes.c_int64 * 2)(*factors),
            window=window, n_buckets=cache.n_buckets, kv=self.projected.data_ptr(),
            hash=None if one_bucket else self.hash.data_ptr(), ring=cache.ring.data_ptr(),
            count=cache.count.data_ptr(), out=self.out.data_ptr(), scores=self.scores.data_ptr(),
            rotated=self.rotated.data_ptr(), rows=self.rows.data_ptr())
        super().__init__(cache, batch, weight, call, "decode_lsh")


class LocalStep(_Step):
    """The attention step of ``cache`` (a caches.LocalCache after prefill) for ``batch`` rows: the query
    sees its chunk and the ``before`` chunks before it."""

    def __init__(self, cache, batch: int):
        heads, d = cache.n_heads, cache.d_head
        self.chunk_length, self.before = cache.chunk_length, cache.before
        weight = cache.weight.t()
        self.projected, self.out, self.scores = _buffers(weight, batch, heads, d,
                                                         (self.before + 1) * self.chunk_length)
        call = LocalDecodeCall(batch=batch, heads=heads, d=d, qkv=self.projected.data_ptr(),
                               out=self.out.data_ptr(), scores=self.scores.data_ptr())
        super().__init__(cache, batch, weight, call, "decode_local")

    def place(self, position: int) -> None:
        self.call.first = max(0, (position // self.chunk_length - self.before) * self.chunk_length)
        self.call.position = position
