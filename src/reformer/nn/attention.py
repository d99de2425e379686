"""Self-attention layers: LSH, local and full. Each is project -> core -> project.

All layers take and return (batch, length, d_model) and accept any length: they pad internally to a
multiple of their chunk length and mask the padding. The cores are tensor functions (ops/); which one
runs is ``ops.backend.choose_core``'s decision, from the config's ``attention_backend``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ReformerConfig
from ..ops import backend, lsh
from ..ops.banded import dropout_seed, local_banded_attention
from ..ops.bands import Band, Window
from ..ops.hashing import hashing_vectors, lsh_rotations, rotation_width
from ..ops.layout import merge_heads, pad_to_multiple, split_heads


def check_layer_inputs(layer: nn.Module, x: torch.Tensor, key_valid: torch.Tensor | None,
                       n_hashes: int | None = None) -> None:
    """ValueError (TypeError for a non-tensor) naming the argument, before a bad input reaches the cores:
    x (batch, length, d_model) floating point, key_valid (batch, length) bool or None."""
    name = type(layer).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    width = layer.qk.in_features if hasattr(layer, "qk") else layer.q.in_features
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"{name}: x must have shape (batch, length, d_model={width}), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: x must hold at least one position, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    weight = layer.out.weight
    if x.device != weight.device or (x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"{name}: x is {x.dtype} on {x.device} but the layer's weights are {weight.dtype} on "
                         f"{weight.device}")
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
            raise ValueError(f"{name}: key_valid must be a bool tensor (True for real positions), got "
                             f"{getattr(key_valid, 'dtype', type(key_valid).__name__)}")
        if key_valid.shape != x.shape[:2] or key_valid.device != x.device:
            raise ValueError(f"{name}: key_valid must have shape (batch, length) = {tuple(x.shape[:2])} on "
                             f"{x.device}, got {tuple(key_valid.shape)} on {key_valid.device}")
    if n_hashes is not None and (isinstance(n_hashes, bool) or not isinstance(n_hashes, int) or n_hashes < 1):
        raise ValueError(f"{name}: n_hashes must be a positive int or None, got {n_hashes!r}")


class LSHSelfAttention(nn.Module):
    """Shared query-key attention restricted to items that hash alike.

    forward(x (batch, length, d_model), key_valid (batch, length) bool or None, n_hashes=None)
    -> (batch, length, d_model).
    """

    def __init__(self, config: ReformerConfig, layer_idx: int = 0):
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.n_hashes, self.n_buckets = config.n_hashes, config.n_buckets
        self.hash_seed, self.layer_idx = config.hash_seed, layer_idx
        self.dropout, self.backend = config.attention_dropout, config.attention_backend
        rule = "bucket" if config.lsh_window == "bucket" else "anchor-lsh"
        self.band = Band(Window(config.chunk_length, config.n_chunks_before, config.n_chunks_after), config.causal,
                         rule)
        inner = config.n_heads * config.d_head
        self.qk = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)
        # Calls made in training mode (a CPU int64 scalar, not a buffer: it stays on the CPU and out of the
        # state dict): with hash_seed and layer_idx it fixes that call's rotations, so runs are
        # reproducible and the reversible backward can replay them (reversible.py).
        self.hash_calls = torch.zeros((), dtype=torch.int64)

    def rotations(self, n_hashes: int, device: torch.device | None = None) -> torch.Tensor:
        """Rotations (heads, d_head, n_hashes, width) on ``device`` (the CPU by default): fixed in eval,
        fresh per call in training."""
        calls = None
        if self.training:
            calls = self.hash_calls.clone()
            self.hash_calls.add_(1)
        return lsh_rotations(calls, self.hash_seed, self.layer_idx, self.n_heads, self.d_head, n_hashes,
                             rotation_width(self.n_buckets), torch.device("cpu") if device is None else device)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> torch.Tensor:
        check_layer_inputs(self, x, key_valid, n_hashes)
        n_hashes = n_hashes or self.n_hashes
        length = x.shape[1]
        x, key_valid = pad_to_multiple(x, key_valid, self.band.chunk_length)
        if self.band.rule == "bucket":
            dropout = self.dropout if self.training else 0.0
            core = backend.choose_core(self.backend, x, self.band, dropout, training=self.training)
            rotations = self.rotations(n_hashes, x.device)
            seed = dropout_seed() if dropout else 0
            out = backend.lsh_attention(x, self.qk.weight, self.v.weight, rotations, self.n_buckets, self.band,
                                        key_valid, dropout, seed, core)
            return self.out(out)[:, :length]
        qk = split_heads(self.qk(x), self.n_heads)            # (B, H, L, d)
        v = split_heads(self.v(x), self.n_heads)
        if x.shape[1] <= self.band.chunk_length:
            # transformers skips hashing when the sequence fits in one chunk: one round of full
            # attention. (Hashing would find the same keys, but its rounds round differently.)
            out = lsh.shared_qk_attention(qk, v, self.band.causal, key_valid, self.dropout, self.training)
        else:
            out = lsh.lsh_attention_all_rounds(qk, v, self.rotations(n_hashes, x.device), self.n_buckets,
                                               self.band, key_valid, self.dropout, self.training,
                                               hashing_vectors(qk, x, self.qk.weight))
        return self.out(merge_heads(out))[:, :length]


class _SeparateQKV(nn.Module):
    """Projections of attention with separate queries, keys and values (no biases)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        inner = config.n_heads * config.d_head
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)


class LocalSelfAttention(_SeparateQKV):
    """Attention within a band of neighbouring chunks of the sequence (separate q, k, v).

    forward(x (batch, length, d_model), key_valid (batch, length) bool or None) -> (batch, length, d_model).
    """

    def __init__(self, config: ReformerConfig, layer_idx: int = 0):
        super().__init__(config)
        self.dropout, self.backend = config.local_attention_dropout, config.attention_backend
        # The anchors' local layers wrap around like their LSH chunks; ours stop at the sequence ends.
        self.band = Band(Window(config.local_chunk_length, config.local_n_chunks_before,
                                config.local_n_chunks_after), config.causal,
                         "local" if config.lsh_window == "bucket" else "anchor-local")

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> torch.Tensor:
        check_layer_inputs(self, x, key_valid)
        length, unmasked = x.shape[1], key_valid is None
        x, key_valid = pad_to_multiple(x, key_valid, self.band.chunk_length)
        if unmasked and self.band.causal and self.band.rule == "local":
            key_valid = None   # the padding follows every real query: causal masking keeps it out (model.py)
        q = split_heads(self.q(x), self.n_heads)
        k = split_heads(self.k(x), self.n_heads) / math.sqrt(self.d_head)
        v = split_heads(self.v(x), self.n_heads)
        if self.band.rule == "anchor-local":   # the anchors' wrap-around band, on the masked core
            out = local_banded_attention(q, k, v, self.band, key_valid, self.dropout, self.training)
        else:
            dropout = self.dropout if self.training else 0.0
            core = backend.choose_core(self.backend, x, self.band, dropout, key_padding=key_valid is not None,
                                       training=self.training)
            out = backend.local_attention(q, k, v, self.band, key_valid, dropout,
                                          dropout_seed() if dropout else 0, core)
        return self.out(merge_heads(out))[:, :length]


class FullSelfAttention(_SeparateQKV):
    """Ordinary softmax attention over the whole sequence, through scaled_dot_product_attention.

    forward(x (batch, length, d_model), key_valid (batch, length) bool or None) -> (batch, length, d_model).
    """

    def __init__(self, config: ReformerConfig, layer_idx: int = 0):
        super().__init__(config)
        self.causal = config.causal
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> torch.Tensor:
        check_layer_inputs(self, x, key_valid)
        q, k, v = (split_heads(proj(x), self.n_heads) for proj in (self.q, self.k, self.v))
        dropout = self.dropout if self.training else 0.0
        if key_valid is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:
            length = x.shape[1]
            mask = key_valid[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            # A padding query with no visible key attends to itself: finite, and never read.
            mask = mask | torch.eye(length, dtype=torch.bool, device=x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(merge_heads(out))


ATTENTION_LAYERS = {"lsh": LSHSelfAttention, "local": LocalSelfAttention, "full": FullSelfAttention}
