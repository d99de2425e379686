"""Incremental decoding with a per-layer cache, one prompt (``generate``) or a batch of prompts of any
lengths (``generate_batch``); sampling (sampling.py: temperature, top-k, top-p, repetition penalty) from a
seed, stop bytes.

Each attention layer keeps what later positions need from earlier ones:
- LSH ("bucket" window): normalised keys, values and the bucket of every position in every round.
  A new query attends, in each round, to the last ``n_chunks_before * chunk_length`` earlier positions
  of its own bucket: exactly the band the full forward gives it, because in bucket mode that band
  depends on earlier positions only. So cached logits equal the full forward's.
- local: keys and values; the query sees its chunk and the ``n_chunks_before`` chunks before it.
- full: keys and values of all earlier positions.
On the CPU in float32 or float64 the attention step of an LSH or local layer is one compiled call
(ops/native/decoding.py); the torch steps here are its reference and serve everywhere else.
A step costs O(context) vector work per layer, against O(context log context) matrix work for a new
full forward. Models with ``lsh_window="chunk"`` (the anchors' semantics, where earlier outputs depend on
later tokens) cannot be cached exactly; they decode by full forwards.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .nn.attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
from .nn.model import ReformerLM
from .nn.reversible import reversible_step
from .ops import backend
from .ops.hashing import hash_vectors, hashing_vectors, total_buckets
from .ops.keys import key_scale
from .ops.layout import split_heads
from .ops.native.decoding import LocalStep, LSHStep
from .sampling import check_sampling, penalise_repeats, sample


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


def _bound_layer_norm(norm: torch.nn.LayerNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """norm's forward with its parameters bound as plain tensors.

    A decode step handles one position, so each operation costs more in Python overhead than in
    arithmetic; module calls and parameter look-ups through nn.Module are a good part of that.
    """
    shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
    return lambda x: F.layer_norm(x, shape, weight, bias, eps)


def _bound_feed_forward(ff) -> Callable[[torch.Tensor], torch.Tensor]:
    """FeedForward's eval-mode forward (no dropout) on (batch, d_model), its parameters bound as plain
    tensors and the products as addmm with the transposed weights (F.linear's dispatch costs more)."""
    norm, activation = _bound_layer_norm(ff.norm), ff.activation
    w1, b1, w2, b2 = ff.dense.weight.t(), ff.dense.bias, ff.output.weight.t(), ff.output.bias
    return lambda x: torch.addmm(b2, activation(torch.addmm(b1, norm(x), w1)), w2)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 where it is 16-bit (as the full forward's products accumulate), else x itself: a step's
    multiply-and-sum would otherwise round every product to 16 bits."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _then(first: Callable, second: Callable) -> Callable:
    return lambda x: second(first(x))


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


def can_cache(model: ReformerLM) -> bool:
    return model.config.lsh_window == "bucket" and model.config.causal


class Decoder:
    """Runs a causal ReformerLM one token at a time with per-layer caches. Eval mode, no gradients.

    decoder.prefill(ids (batch, prompt)) -> logits (batch, vocab) for the next token;
    decoder.step(token (batch,)) -> logits (batch, vocab) for the token after it.
    The attention projections are fused copies made here: build a new decoder after changing weights.
    """

    POSITION_BLOCK = 256   # position embeddings are formed this many steps at a time

    def __init__(self, model: ReformerLM):
        if not can_cache(model):
            raise ValueError("cached decoding needs a causal model with lsh_window='bucket'")
        self.model = model.eval()
        self.blocks = list(model.stack.blocks)
        self.caches = [CACHES[type(b.attention.attention)](b.attention.attention) for b in self.blocks]
        self.steps = [(_then(_bound_layer_norm(b.attention.norm), cache.step), _bound_feed_forward(b.feed_forward))
                      for b, cache in zip(self.blocks, self.caches, strict=True)]
        self.final_norm, self.head = _bound_layer_norm(model.norm), (model.head.bias, model.head.weight.t())
        self.length = 0
        self.positions = (0, None)   # (first position, its position embeddings (block, d_model))

    @torch.inference_mode()   # no view tracking or version counters: a decode step is mostly overhead
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(ids, torch.arange(ids.shape[1], device=ids.device))
        x1 = x2 = x
        for block, cache in zip(self.blocks, self.caches, strict=True):
            def attend(x, block=block, cache=cache):
                h = block.attention.norm(x)
                cache.prefill(h)
                return block.attention.attention(h)
            x1, x2 = reversible_step(x1, x2, attend, block.feed_forward)
        self.length = ids.shape[1]
        return self.model.logits(x1[:, -1:], x2[:, -1:])[:, 0]

    def _embed(self, token: torch.Tensor) -> torch.Tensor:
        """model.embed of one token per row at position self.length: (batch,) -> (batch, d_model)."""
        x = F.embedding(token, self.model.token_embedding.weight)
        if self.model.position_embedding is None:
            return x
        first, table = self.positions
        if table is None or not first <= self.length < first + table.shape[0]:
            first = self.length
            positions = torch.arange(first, first + self.POSITION_BLOCK, device=token.device)
            table = self.model.position_embedding(positions.clamp(max=self.model.config.max_seq_len - 1))
            self.positions = first, table
        return x + table[self.length - first]

    @torch.inference_mode()   # no view tracking or version counters: a decode step is mostly overhead
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.length >= self.model.config.max_seq_len:
            raise ValueError(f"the context is full (max_seq_len={self.model.config.max_seq_len})")
        x1 = x2 = self._embed(token)
        for attend, feed_forward in self.steps:
            x1, x2 = reversible_step(x1, x2, attend, feed_forward)
        self.length += 1
        return torch.addmm(self.head[0], self.final_norm(torch.cat([x1, x2], dim=-1)), self.head[1])


def generate(model: ReformerLM, prompt: Iterable[int] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop: Iterable[int] = (), use_cache: bool = True,
             on_token: Callable[[int], None] | None = None, repetition_penalty: float = 1.0,
             penalty_window: int = 32) -> list[int]:
    """Continue ``prompt`` (token ids) by up to ``max_new_tokens`` tokens; return the new ones.

    Stops early at a token in ``stop`` (it is included) or when the context reaches max_seq_len.
    ``on_token`` is called with each new token as soon as it is drawn (for streaming).
    ``repetition_penalty`` > 1 makes the tokens among the last ``penalty_window`` less likely
    (penalise_repeats): a short-trained byte model otherwise loops on its likeliest byte (spaces).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty, penalty_window)
    if not model.config.causal:
        raise ValueError("generation needs a causal model; this one is a bidirectional encoder "
                         "(config.causal=False)")
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
        if repetition_penalty != 1.0:   # no tensor of recent tokens per step unless it is used
            recent = torch.cat([ids[0], torch.tensor(new, dtype=torch.long, device=device)])[-penalty_window:]
            logits = penalise_repeats(logits, recent[None], repetition_penalty)
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


def generate_batch(model: ReformerLM, prompts: Sequence[Iterable[int]], max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                   stop: Iterable[int] = (), repetition_penalty: float = 1.0,
                   penalty_window: int = 32) -> list[list[int]]:
    """Continue each of a batch of prompts, of any lengths, by up to ``max_new_tokens``: one cached decoder
    for the whole batch. Returns each prompt's new tokens.

    Every row moves one position per step: a row still inside its prompt is fed its next prompt token (the
    logits it gets there are not sampled), the others their last sample, so each row sees exactly the
    context it would see alone. Row i samples with a generator of its own seeded ``seed + i``: its tokens
    are those of ``generate(model, prompts[i], seed=seed + i, ...)`` wherever the batched products round
    alike. A row stops at a ``stop`` token, after max_new_tokens, or at max_seq_len.
    """
    rows = [list(p.tolist() if isinstance(p, torch.Tensor) else p) for p in prompts]
    if not rows or any(not row for row in rows):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    if not can_cache(model):
        raise ValueError("batched generation needs cached decoding: a causal model with lsh_window='bucket'")
    check_sampling(temperature, top_k, top_p, repetition_penalty, penalty_window)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.max_seq_len
    if max(map(len, rows)) >= limit:
        raise ValueError(f"every prompt must be shorter than max_seq_len ({limit})")
    device = next(model.parameters()).device
    for row in rows:
        model.check_inputs(torch.tensor([row], dtype=torch.long, device=device))
    stop, shortest = set(stop), min(map(len, rows))
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(rows))]
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    decoder = Decoder(model)
    logits = decoder.prefill(torch.tensor([row[:shortest] for row in rows], dtype=torch.long, device=device))
    for position in range(shortest, limit):
        tokens = []
        for i, row in enumerate(rows):
            if position < len(row) or done[i]:   # inside the prompt, or finished: fed, not sampled
                tokens.append(row[position] if position < len(row) else (new[i] or row)[-1])
                continue
            row_logits = logits[i:i + 1]
            if repetition_penalty != 1.0:
                recent = torch.tensor((row + new[i])[-penalty_window:], dtype=torch.long, device=device)
                row_logits = penalise_repeats(row_logits, recent[None], repetition_penalty)
            token = int(sample(row_logits, generators[i], temperature, top_k, top_p))
            new[i].append(token)
            done[i] = token in stop or len(new[i]) >= max_new_tokens or len(row) + len(new[i]) >= limit
            tokens.append(token)
        if all(done):
            break
        logits = decoder.step(torch.tensor(tokens, dtype=torch.long, device=device))
    return new
