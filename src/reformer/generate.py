"""Incremental decoding with a per-layer cache (caches.py), one prompt (``generate``) or a batch of
prompts of any lengths (``generate_batch``); sampling (sampling.py: temperature, top-k, top-p, repetition
penalty) from a seed, stop bytes.

Cached logits equal the full forward's. Models with ``lsh_window="chunk"`` (the anchors' semantics, where
earlier outputs depend on later tokens) cannot be cached exactly; they decode by full forwards.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .caches import CACHES
from .nn.model import ReformerLM
from .nn.reversible import reversible_step
from .sampling import check_sampling, penalise_repeats, sample


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


def _then(first: Callable, second: Callable) -> Callable:
    return lambda x: second(first(x))


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
