"""Per-layer caches for incremental decoding (generate.Decoder): what later positions need from earlier
ones, filled by ``prefill`` from a prompt's normed inputs and advanced by ``step`` one position at a time.

- LSH ("bucket" window): normalised keys, values and the bucket of every position in every round.
  A new query attends, in each round, to the last ``n_chunks_before * chunk_length`` earlier positions
  of its own bucket: exactly the band the full forward gives it, because in bucket mode that band
  depends on earlier positions only. So cached logits equal the full forward's.
- local: keys and values; the query sees its chunk and the ``n_chunks_before`` chunks before it.
- full: keys and values of all earlier positions.
On the CPU in float32 or float64 the attention step of an LSH or local layer is one compiled call
(ops/native/decoding.py); the torch steps here are its reference and serve everywhere else.
A step costs O(context) vector work per layer, against O(context log context) matrix work for a new
full forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .nn.attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
from .ops import backend
from .ops.hashing import hash_vectors, hashing_vectors, total_buckets
from .ops.keys import key_scale
from .ops.layout import split_heads
from .ops.native.decoding import LocalStep, LSHStep


class _Growing:
    """A (batch, heads, [rounds,] length, ...) tensor that grows along ``dim`` without re-copying."""

    def __init__(self, dim: int):
        self.dim, self.data, self.length = dim, None, 0

    def reserve(self, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Room for n more along ``dim`` (a first storage shaped like ``like``); return the storage."""
        if self.data is None or self.length + n > self.data.shape[self.dim]:
            shape = list((like if self.data is None else self.data).shape)
            shape[self.dim] = max(2 * (self.length + n), 64)
            grown = (like if self.data is None else self.data).new_empty(shape)
            if self.data is not None:
                grown.narrow(self.dim, 0, self.length).copy_(self.view())
            self.data = grown
        return self.data

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append x along ``dim``; return the view of the storage it was written to."""
        n = x.shape[self.dim]
        written = self.reserve(n, like=x).narrow(self.dim, self.length, n)
        written.copy_(x)
        self.length += n
        return written

    def view(self, start: int = 0) -> torch.Tensor:
        return self.data.narrow(self.dim, start, self.length - start)


def _per_head_rows(*weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Stack projection weights (heads * d, d_model) each so that one projection gives, per head, the
    outputs side by side: x @ W.T viewed (..., heads, len(weights) * d) is (w1 out | w2 out | ...)."""
    d_model = weights[0].shape[1]
    return torch.stack([w.view(n_heads, -1, d_model) for w in weights], dim=1).reshape(-1, d_model)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 where it is 16-bit (as the full forward's products accumulate), else x itself: a step's
    multiply-and-sum would otherwise round every product to 16 bits."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class LSHCache:
    """Keys and values side by side, and per (round, bucket) a ring of the last ``window`` positions
    hashed there.

    A step looks up the ring of its bucket in each round: O(rounds x window) work, whatever the context.
    One token's step is a few dozen small operations, each costing more in overhead than in arithmetic,
    so it is written lean: one projection giving each head's qk | v side by side, stored as they come
    (keys normalised by vector_norm and hypot, written into the cache), hashing as one product with
    [R, -R], one row gather for keys and values of all rounds together, and the rounds combined by one
    softmax over all their keys:
    with o_r = sum_j exp(l_rj - lse_r) v_rj and weights softmax(lse_r), sum_r w_r o_r is exactly the
    softmax over the union of the rounds' logits (a key found in two rounds counts twice in both).
    """

    def __init__(self, layer: LSHSelfAttention):
        self.n_heads, self.d_head, self.n_buckets_config = layer.n_heads, layer.d_head, layer.n_buckets
        self.window = layer.band.before * layer.band.chunk_length
        self.key_values = _Growing(2)                       # (B, H, length, 2 d): key | value
        self.rotations = layer.rotations(layer.n_hashes)   # eval mode: the fixed rotations
        self.n_buckets = total_buckets(layer.n_buckets)
        self.weight = _per_head_rows(layer.qk.weight, layer.v.weight, n_heads=layer.n_heads)
        self.step_weight, self.out_weight = self.weight.t(), layer.out.weight.t()   # for torch.mm
        self.backend, self.band = layer.backend, layer.band
        self.factors = layer.n_buckets if isinstance(layer.n_buckets, tuple) else (layer.n_buckets,)
        # argmax over [xR, -xR] per factor is the argmax of x [R, -R]: one product for all rounds.
        parts, first = [], 0
        for factor in self.factors:
            part = self.rotations[..., first:first + factor // 2]
            parts += [part, -part]
            first += factor // 2
        # (H, d, R * sum(factors)) on the weights' device, in float32 (float64 for float64 weights), as
        # hashing.hash_vectors rotates
        hash_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.hash_matrix = torch.cat(parts, dim=-1).flatten(2).to(self.weight.device, hash_dtype)
        self.hash_weight = layer.qk.weight.to(hash_dtype)   # 16-bit models hash float32 projections
        self.slots = torch.arange(self.window, device=self.weight.device)
        self.ring = self.count = None
        self.native = None   # after prefill, where the compiled core serves: that step as one call
        self.rows = None   # (storage, its (rows, 2d) view, first row of each (batch, head)) for gathers

    def prefill(self, h: torch.Tensor) -> None:
        kv = split_heads(F.linear(h, self.weight), self.n_heads)           # (B, H, n, qk | v)
        qk = kv[..., :self.d_head]
        self.key_values.append(kv)[..., :self.d_head] = qk * key_scale(qk)[0][..., None]
        compiled = backend.choose_core(self.backend, h, self.band, 0.0) == "native"
        buckets = hash_vectors(hashing_vectors(qk, h, self.hash_weight), self.rotations, self.n_buckets_config,
                               compiled)                                   # (B, H, R, n)
        batch, heads, rounds, length = buckets.shape
        self.count = torch.zeros(batch, heads, rounds, self.n_buckets, dtype=torch.long, device=h.device)
        self.count.scatter_add_(-1, buckets, torch.ones_like(buckets))
        # Each position's rank among the earlier members of its bucket decides its ring slot; only the
        # last ``window`` members of a bucket stay (the others go to a spare last slot, then dropped).
        sorted_keys, _ = torch.sort(buckets * length + torch.arange(length, device=h.device), dim=-1)
        sorted_buckets, positions = sorted_keys // length, sorted_keys % length
        starts = (self.count.cumsum(-1) - self.count).gather(-1, sorted_buckets)
        rank = torch.arange(length, device=h.device) - starts
        keep = rank >= self.count.gather(-1, sorted_buckets) - self.window
        spare = self.n_buckets * self.window
        slot = torch.where(keep, sorted_buckets * self.window + rank % self.window, spare)
        # Slots fill in order, then wrap: slot s of a bucket holds a member iff s < its count (others: 0).
        ring = torch.zeros((batch, heads, rounds, spare + 1), dtype=torch.long, device=h.device)
        self.ring = ring.scatter_(-1, slot, positions)[..., :spare].contiguous()
        self.native = LSHStep(self, batch) if compiled else None   # the same step as one compiled call

    def _hash(self, qk: torch.Tensor) -> torch.Tensor:
        """Buckets (B, H, R, 1) of one position's hashing vectors (B, H, 1, d), as ``hash_vectors`` gives
        them."""
        if self.n_buckets == 1:
            return torch.zeros_like(self.count[..., :1])
        rotated = (qk @ self.hash_matrix).view(*qk.shape[:2], self.rotations.shape[2], -1)
        if len(self.factors) == 1:
            return rotated.argmax(dim=-1, keepdim=True)
        ids, first, scale = 0, 0, 1
        for factor in self.factors:
            ids = ids + scale * rotated[..., first:first + factor].argmax(dim=-1, keepdim=True)
            first, scale = first + factor, scale * factor
        return ids

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Key | value rows (B, H, m, 2d) at positions (B, H, ...): one row copy."""
        data = self.key_values.data
        if self.rows is None or self.rows[0] is not data:     # the storage grew: new row numbers
            batch, heads, capacity, width = data.shape
            first = torch.arange(batch * heads, device=data.device).view(batch, heads, 1, 1) * capacity
            self.rows = data, data.view(-1, width), first
        _, flat, first = self.rows
        return flat.index_select(0, (index + first).view(-1)).view(*index.shape[:2], -1, flat.shape[1])

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """h (batch, d_model) of one position -> (batch, d_model)."""
        if self.native is not None:
            return self.native(h)
        batch, heads, d = h.shape[0], self.n_heads, self.d_head
        kv = torch.mm(h, self.step_weight).view(batch, heads, 1, 2 * d)   # (B, H, 1, qk | v)
        qk = kv[..., :d]
        t = self.key_values.length
        torch.mul(qk, key_scale(qk)[0][..., None], out=self.key_values.append(kv)[..., :d])
        bucket = self._hash(hashing_vectors(qk, h[:, None], self.hash_weight))   # (B, H, R, 1)
        count = self.count.gather(-1, bucket)                              # earlier members per round
        base = bucket * self.window
        rows = self._gather(self.ring.gather(-1, base + self.slots))      # (B, H, R W, 2d)
        # Products as multiply-and-sum: at these sizes that is faster than a batched matmul.
        logits = (_wide(rows[..., :d]) * _wide(qk)).sum(-1, keepdim=True)   # (B, H, R W, 1)
        logits.masked_fill_((self.slots >= count).view(batch, heads, -1, 1), float("-inf"))
        out = (torch.softmax(logits, dim=2) * _wide(rows[..., d:])).sum(2, keepdim=True).to(kv.dtype)   # (B, H, 1, d)
        # Remember position t in the ring of its bucket, replacing the oldest member.
        self.ring.scatter_(-1, base + count % self.window, t)
        self.count.scatter_(-1, bucket, count + 1)
        # With no earlier member in any round the query's only key is itself (softmax gave NaN). That is
        # rare, so on the CPU, where reading the check costs no device sync, the where runs only if needed.
        if count.device.type != "cpu" or not count.all():
            out = torch.where(count.amax(dim=(-2, -1), keepdim=True) > 0, out, kv[..., d:])
        return torch.mm(out.view(batch, heads * d), self.out_weight)


class _KeyValueCache:
    """Keys and values of every earlier position side by side, for local and full layers, from one
    projection giving each head's q | k | v."""

    def __init__(self, layer, key_divisor: float = 1.0):
        self.n_heads, self.d_head = layer.n_heads, layer.d_head
        self.key_values = _Growing(2)                       # (B, H, length, 2 d): key | value
        # Keys divided in the weight: k / c = (W_k / c) h up to rounding (1 ulp), for one op less a step.
        self.weight = _per_head_rows(layer.q.weight, layer.k.weight / key_divisor, layer.v.weight,
                                     n_heads=layer.n_heads)
        self.out_weight = layer.out.weight.t()                             # for torch.mm

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """Append the keys and values of h (B, n, d_model), or of one position (B, d_model); return its
        queries (B, H, n, d)."""
        qkv = F.linear(h, self.weight)
        if h.dim() == 2:
            qkv = qkv.view(h.shape[0], self.n_heads, 1, -1)                 # (B, H, 1, q | k | v)
        else:
            qkv = split_heads(qkv, self.n_heads)                           # (B, H, n, q | k | v)
        self.key_values.append(qkv[..., self.d_head:])
        return qkv[..., :self.d_head]

    def prefill(self, h: torch.Tensor) -> None:
        self._project(h)


class LocalCache(_KeyValueCache):
    def __init__(self, layer: LocalSelfAttention):
        super().__init__(layer, key_divisor=math.sqrt(layer.d_head))   # as the local layer scales keys
        self.chunk_length, self.before = layer.band.chunk_length, layer.band.before
        self.backend, self.band = layer.backend, layer.band
        self.native = None   # after prefill, where the compiled core serves: the step as one call

    def prefill(self, h: torch.Tensor) -> None:
        super().prefill(h)
        if backend.choose_core(self.backend, h, self.band, 0.0) == "native":
            self.native = LocalStep(self, h.shape[0])

    def step(self, h: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native(h)
        q, d = self._project(h), self.d_head
        t = self.key_values.length - 1
        key_values = self.key_values.view(max(0, (t // self.chunk_length - self.before) * self.chunk_length))
        # Products as multiply-and-sum: at these sizes that is faster than a batched matmul.
        probs = torch.softmax((_wide(key_values[..., :d]) * _wide(q)).sum(-1, keepdim=True), dim=2)   # (B, H, n, 1)
        out = (probs * _wide(key_values[..., d:])).sum(2).to(q.dtype)   # (B, H, d)
        return torch.mm(out.view(out.shape[0], -1), self.out_weight)


class FullCache(_KeyValueCache):
    def step(self, h: torch.Tensor) -> torch.Tensor:
        q, d = self._project(h), self.d_head
        key_values = self.key_values.view()
        out = F.scaled_dot_product_attention(q, key_values[..., :d], key_values[..., d:])
        return torch.mm(out.view(out.shape[0], -1), self.out_weight)


CACHES = {LSHSelfAttention: LSHCache, LocalSelfAttention: LocalCache, FullSelfAttention: FullCache}
