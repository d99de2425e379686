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

from .attention import (FullSelfAttention, LocalSelfAttention, LSHSelfAttention, combine_rounds,
                        merge_heads, normalize_keys, split_heads)
from .hashing import hash_vectors, total_buckets
from .rounds import gather_items
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
    """Keys, values, and per (round, bucket) a ring of the last ``window`` positions hashed there.

    A step looks up the ring of its bucket in each round: O(rounds x window) work, whatever the context.
    """

    def __init__(self, layer: LSHSelfAttention):
        self.layer = layer
        self.window = layer.band.before * layer.band.chunk_length
        self.keys, self.values = _Growing(2), _Growing(2)
        self.rotations = layer.rotations(layer.n_hashes)   # eval mode: the fixed rotations
        self.n_buckets = total_buckets(layer.n_buckets)
        self.ring = self.count = None

    def _project(self, h: torch.Tensor):
        layer = self.layer
        qk = split_heads(layer.qk(h), layer.n_heads)
        self.keys.append(normalize_keys(qk))
        self.values.append(split_heads(layer.v(h), layer.n_heads))
        return qk, hash_vectors(qk, self.rotations, layer.n_buckets)      # (B, H, R, n)

    def prefill(self, h: torch.Tensor) -> None:
        _, buckets = self._project(h)
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

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """h (batch, 1, d_model) -> (batch, 1, d_model)."""
        layer = self.layer
        qk, bucket = self._project(h)                                   # bucket (B, H, R, 1)
        t = self.keys.length - 1
        slots = bucket * self.window + torch.arange(self.window, device=h.device)
        members = self.ring.gather(-1, slots)                           # (B, H, R, window), -1 = empty
        present = members >= 0
        index = members.clamp_min(0).flatten(2)
        keys = gather_items(self.keys.view(), index).unflatten(2, members.shape[2:])  # (B, H, R, W, d)
        values = gather_items(self.values.view(), index).unflatten(2, members.shape[2:])
        logits = (keys @ qk[:, :, None].transpose(-1, -2))[..., 0]      # (B, H, R, window)
        logits = logits.masked_fill(~present, float("-inf"))
        has_other = present.any(dim=-1, keepdim=True)                   # (B, H, R, 1)
        self_logit = (qk * self.keys.view()[:, :, t:]).sum(-1, keepdim=True)  # (B, H, 1, 1)
        self_logit = self_logit.expand_as(has_other).masked_fill(has_other, float("-inf"))
        logits = torch.cat([logits, self_logit], dim=-1)
        values = torch.cat([values, self.values.view()[:, :, t:, None].expand(-1, -1, values.shape[2], -1, -1)],
                           dim=-2)
        probs = torch.softmax(logits, dim=-1)
        lse = logits.amax(dim=-1) - torch.log(probs.amax(dim=-1))       # as in the banded core
        out = (probs[..., None, :] @ values)                             # (B, H, R, 1, d)
        combined = combine_rounds(out, lse[..., None], has_other)
        # Remember position t in the ring of its bucket, replacing the oldest member.
        index = bucket * self.window + self.count.gather(-1, bucket) % self.window
        self.ring.scatter_(-1, index, torch.full_like(index, t))
        self.count.scatter_add_(-1, bucket, torch.ones_like(bucket))
        return layer.out(merge_heads(combined))


class _KeyValueCache:
    """Keys and values of every earlier position, for local and full layers."""

    def __init__(self, layer, key_divisor: float = 1.0):
        self.layer, self.key_divisor = layer, key_divisor
        self.keys, self.values = _Growing(2), _Growing(2)

    def _project(self, h: torch.Tensor) -> None:
        layer = self.layer
        self.keys.append(split_heads(layer.k(h), layer.n_heads) / self.key_divisor)
        self.values.append(split_heads(layer.v(h), layer.n_heads))

    def prefill(self, h: torch.Tensor) -> None:
        self._project(h)


class LocalCache(_KeyValueCache):
    def __init__(self, layer: LocalSelfAttention):
        super().__init__(layer, key_divisor=math.sqrt(layer.d_head))   # as the local layer scales keys

    def step(self, h: torch.Tensor) -> torch.Tensor:
        layer, band = self.layer, self.layer.band
        self._project(h)
        t = self.keys.length - 1
        start = max(0, (t // band.chunk_length - band.before) * band.chunk_length)
        q = split_heads(layer.q(h), layer.n_heads)
        probs = torch.softmax(q @ self.keys.view()[:, :, start:].transpose(-1, -2), dim=-1)
        return layer.out(merge_heads(probs @ self.values.view()[:, :, start:]))


class FullCache(_KeyValueCache):
    def step(self, h: torch.Tensor) -> torch.Tensor:
        self._project(h)
        q = split_heads(self.layer.q(h), self.layer.n_heads)
        out = F.scaled_dot_product_attention(q, self.keys.view(), self.values.view())
        return self.layer.out(merge_heads(out))


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
