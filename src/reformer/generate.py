"""Incremental decoding with a per-layer cache, and sampling (temperature, top-k, top-p, seed, stop bytes).

Each attention layer keeps what later positions need from earlier ones:
- LSH ("bucket" window): normalised keys, values and the bucket of every position in every round.
  A new query attends, in each round, to the last ``n_chunks_before * chunk_length`` earlier positions
  of its own bucket: exactly the band the full forward gives it, because in bucket mode that band
  depends on earlier positions only. So cached logits equal the full forward's.
- local: keys and values; the query sees its chunk and the ``n_chunks_before`` chunks before it.
- full: keys and values of all earlier positions.
A step costs O(context) vector work per layer, against O(context log context) matrix work for a new
full forward. Models with ``lsh_window="chunk"`` (the anchors' semantics, where earlier outputs depend on
later tokens) cannot be cached exactly; they decode by full forwards.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention, normalize_keys, split_heads
from .hashing import hash_vectors, total_buckets
from .model import ReformerLM


class _Growing:
    """A (batch, heads, [rounds,] length, ...) tensor that grows along ``dim`` without re-copying."""

    def __init__(self, dim: int):
        self.dim, self.data, self.length = dim, None, 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[self.dim]
        if self.data is None or self.length + n > self.data.shape[self.dim]:
            shape = list(x.shape)
            shape[self.dim] = max(2 * (self.length + n), 64)
            grown = x.new_empty(shape)
            if self.data is not None:
                grown.narrow(self.dim, 0, self.length).copy_(self.view())
            self.data = grown
        self.data.narrow(self.dim, self.length, n).copy_(x)
        self.length += n

    def view(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.length)


class LSHCache:
    """Keys and values side by side, and per (round, bucket) a ring of the last ``window`` positions
    hashed there.

    A step looks up the ring of its bucket in each round: O(rounds x window) work, whatever the context.
    One token's step is a few dozen small operations, so it is written lean: one fused projection, one
    row gather for keys and values together, and the self-only rounds handled without concatenation.
    """

    def __init__(self, layer: LSHSelfAttention):
        self.layer = layer
        self.window = layer.band.before * layer.band.chunk_length
        self.key_values = _Growing(2)                       # (B, H, length, 2 d): key | value
        self.rotations = layer.rotations(layer.n_hashes)   # eval mode: the fixed rotations
        self.n_buckets = total_buckets(layer.n_buckets)
        self.weight = torch.cat([layer.qk.weight, layer.v.weight])   # one projection for qk and v
        self.slots = torch.arange(self.window, device=self.weight.device)
        self.ring = self.count = None
        self.rows = None   # (storage, its (rows, 2d) view, first row of each (batch, head)) for gathers

    def _project(self, h: torch.Tensor):
        layer = self.layer
        qk, v = (split_heads(x, layer.n_heads) for x in F.linear(h, self.weight).chunk(2, dim=-1))
        self.key_values.append(torch.cat([normalize_keys(qk), v], dim=-1))
        return qk, v

    def prefill(self, h: torch.Tensor) -> None:
        qk, _ = self._project(h)
        buckets = hash_vectors(qk, self.rotations, self.layer.n_buckets)   # (B, H, R, n)
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
        ring = torch.full((batch, heads, rounds, spare + 1), -1, dtype=torch.long, device=h.device)
        self.ring = ring.scatter_(-1, slot, positions)[..., :spare].contiguous()

    def _hash(self, qk: torch.Tensor) -> torch.Tensor:
        """Buckets (B, H, R, 1) of one position's qk (B, H, 1, d): ``hash_vectors`` in a few operations."""
        rotated = (qk @ self.rotations.flatten(2)).view(*qk.shape[:2], self.rotations.shape[2], -1)
        factors = self.layer.n_buckets if isinstance(self.layer.n_buckets, tuple) else (self.layer.n_buckets,)
        ids, first, scale = 0, 0, 1
        for factor in factors:
            part = rotated[..., first:first + factor // 2]
            ids = ids + scale * torch.cat([part, -part], dim=-1).argmax(dim=-1, keepdim=True)
            first, scale = first + factor // 2, scale * factor
        return ids

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Key | value rows (B, H, m, 2d) at positions (B, H, m): one row copy."""
        data = self.key_values.data
        if self.rows is None or self.rows[0] is not data:     # the storage grew: new row numbers
            batch, heads, capacity, width = data.shape
            first = torch.arange(batch * heads, device=data.device).view(batch, heads, 1) * capacity
            self.rows = data, data.view(-1, width), first
        _, flat, first = self.rows
        return flat.index_select(0, (index + first).flatten()).view(*index.shape, -1)

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """h (batch, 1, d_model) -> (batch, 1, d_model)."""
        qk, v = self._project(h)
        bucket = self._hash(qk) if self.n_buckets > 1 else torch.zeros_like(self.count[..., :1])
        batch, heads, rounds, _ = bucket.shape
        d = qk.shape[-1]
        members = self.ring.gather(-1, bucket * self.window + self.slots)   # (B, H, R, W), -1 = empty
        present = members >= 0
        rows = self._gather(members.clamp_min(0).flatten(2))             # (B, H, R W, 2d)
        logits = (rows[..., :d] @ qk.transpose(-1, -2)).view(batch, heads, rounds, self.window)
        has_other = present.any(dim=-1)                                 # (B, H, R)
        # A round with no earlier member returns the query's own value (its only key); give its row
        # finite logits so that the softmax stays defined, and no weight below.
        logits = logits.masked_fill(~(present | ~has_other[..., None]), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = (probs[..., None, :] @ rows[..., d:].view(batch, heads, rounds, self.window, d))[..., 0, :]
        # Rounds combined by the softmax of their normalisers, over the rounds that saw others.
        lse = torch.logsumexp(logits, dim=-1).masked_fill(~has_other, float("-inf"))
        combined = torch.softmax(lse, dim=-1)[..., None, :] @ out       # (B, H, 1, d); NaN if no round saw
        combined = torch.where(has_other.any(dim=-1)[..., None, None], combined, v)   # others: then v
        # Remember position t in the ring of its bucket, replacing the oldest member.
        t = self.key_values.length - 1
        index = bucket * self.window + self.count.gather(-1, bucket) % self.window
        self.ring.scatter_(-1, index, torch.full_like(index, t))
        self.count.scatter_add_(-1, bucket, torch.ones_like(bucket))
        return self.layer.out(combined.view(batch, 1, heads * d))


class _KeyValueCache:
    """Keys and values of every earlier position, for local and full layers, from one fused projection."""

    def __init__(self, layer, key_divisor: float = 1.0):
        self.layer, self.key_divisor = layer, key_divisor
        self.keys, self.values = _Growing(2), _Growing(2)
        self.weight = torch.cat([layer.q.weight, layer.k.weight, layer.v.weight])

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """Append h's keys and values; return its queries (B, H, n, d)."""
        q, k, v = (split_heads(x, self.layer.n_heads) for x in F.linear(h, self.weight).chunk(3, dim=-1))
        self.keys.append(k / self.key_divisor)
        self.values.append(v)
        return q

    def prefill(self, h: torch.Tensor) -> None:
        self._project(h)


class LocalCache(_KeyValueCache):
    def __init__(self, layer: LocalSelfAttention):
        super().__init__(layer, key_divisor=math.sqrt(layer.d_head))   # as the local layer scales keys

    def step(self, h: torch.Tensor) -> torch.Tensor:
        band = self.layer.band
        q = self._project(h)
        t = self.keys.length - 1
        start = max(0, (t // band.chunk_length - band.before) * band.chunk_length)
        probs = torch.softmax(q @ self.keys.view()[:, :, start:].transpose(-1, -2), dim=-1)
        out = probs @ self.values.view()[:, :, start:]                  # (B, H, 1, d)
        return self.layer.out(out.view(out.shape[0], 1, -1))


class FullCache(_KeyValueCache):
    def step(self, h: torch.Tensor) -> torch.Tensor:
        q = self._project(h)
        out = F.scaled_dot_product_attention(q, self.keys.view(), self.values.view())
        return self.layer.out(out.view(out.shape[0], 1, -1))


CACHES = {LSHSelfAttention: LSHCache, LocalSelfAttention: LocalCache, FullSelfAttention: FullCache}


def can_cache(model: ReformerLM) -> bool:
    return model.config.lsh_window == "bucket" and model.config.causal


class Decoder:
    """Runs a causal ReformerLM one token at a time with per-layer caches. Eval mode, no gradients.

    decoder.prefill(ids (batch, prompt)) -> logits (batch, vocab) for the next token;
    decoder.step(token (batch,)) -> logits (batch, vocab) for the token after it.
    """

    def __init__(self, model: ReformerLM):
        if not can_cache(model):
            raise ValueError("cached decoding needs a causal model with lsh_window='bucket'")
        self.model = model.eval()
        self.blocks = list(model.stack.blocks)
        self.caches = [CACHES[type(b.attention.attention)](b.attention.attention) for b in self.blocks]
        self.length = 0

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(ids, torch.arange(ids.shape[1], device=ids.device))
        x1 = x2 = x
        for block, cache in zip(self.blocks, self.caches):
            h = block.attention.norm(x2)
            cache.prefill(h)
            x1 = x1 + block.attention.attention(h)
            x2 = x2 + block.feed_forward(x1)
        self.length = ids.shape[1]
        return self.model.logits(x1[:, -1:], x2[:, -1:])[:, 0]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.length >= self.model.config.max_seq_len:
            raise ValueError(f"the context is full (max_seq_len={self.model.config.max_seq_len})")
        position = torch.tensor([self.length], device=token.device)
        x = self.model.embed(token[:, None], position)
        x1 = x2 = x
        for block, cache in zip(self.blocks, self.caches):
            x1 = x1 + cache.step(block.attention.norm(x2))
            x2 = x2 + block.feed_forward(x1)
        self.length += 1
        return self.model.logits(x1, x2)[:, 0]


def sample(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Draw one token per row of logits (batch, vocab). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p   # keep the smallest set reaching p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def generate(model: ReformerLM, prompt: Iterable[int] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop: Iterable[int] = (), use_cache: bool = True,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue ``prompt`` (token ids) by up to ``max_new_tokens`` tokens; return the new ones.

    Stops early at a token in ``stop`` (it is included) or when the context reaches max_seq_len.
    ``on_token`` is called with each new token as soon as it is drawn (for streaming).
    """
    if not model.config.causal:
        raise ValueError("generation needs a causal model; this one is a bidirectional encoder "
                         "(config.causal=False)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    ids = torch.as_tensor(list(prompt) if not isinstance(prompt, torch.Tensor) else prompt,
                          dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    model.check_inputs(ids)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    stop = set(stop)
    cached = use_cache and can_cache(model)
    decoder = Decoder(model) if cached else None
    with torch.no_grad():
        logits = decoder.prefill(ids) if cached else model(ids)[:, -1]
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = sample(logits, generator, temperature, top_k, top_p)
        new.append(int(token))
        if on_token is not None:
            on_token(int(token))
        if int(token) in stop or ids.shape[1] + len(new) >= model.config.max_seq_len:
            break
        with torch.no_grad():
            if cached:
                logits = decoder.step(token)
            else:
                context = torch.cat([ids, torch.tensor([new], device=device)], dim=1)
                logits = model(context)[:, -1]
    return new
