"""Which attention core runs, decided in one place, and the functions the layers call.

``attention_backend`` (a ReformerConfig field) names the core:
    "native"  the compiled interval core (native/): CPU, float32 or float64, no attention dropout; local
              layers without per-key padding. The fastest core on the CPU.
    "flex"    FlexAttention (flex.py), compiled on CUDA; on the CPU a forward-only reference. No attention
              dropout.
    "eager"   batched torch products (intervals.py, rounds.py): any device and dtype, attention dropout,
              padding.
    "auto"    per call: "native" on the CPU where it serves the call, "flex" on CUDA where it does, else
              "eager". Local layers given padding keys, attention dropout in training and autocast's
              bfloat16 run on the eager core.
The anchors' chunk window (lsh_window="chunk", for transformers parity) exists on the masked reference
core only (banded.py); full attention is always SDPA. ``choose_core`` applies these rules and raises a
ValueError for a request that cannot be honoured; nothing below it chooses again.
"""

from __future__ import annotations

import torch

from . import flex
from .bands import Band
from .bucket_attention import EagerLSH, keep_rounds, project_pairs, split_pairs
from .hashing import hash_with_padding, hashing_vectors, with_padding
from .intervals import interval_attention, local_spans
from .layout import merge_heads, split_heads
from .native import build
from .native import ops as native_ops

ATTENTION_BACKENDS = ("auto", "native", "flex", "eager")
NATIVE_DTYPES = (torch.float32, torch.float64)


_available: tuple[str, ...] | None = None


def available_backends() -> tuple[str, ...]:
    """The backends this machine offers: "native" where a C compiler builds the kernels, "flex" where torch
    has FlexAttention. Found out once per process (every ReformerConfig asks, so a compiled model reads
    the answer and never traces the build)."""
    global _available
    if _available is None:
        offered = ["auto"]
        if build.library() is not None:
            offered.append("native")
        if flex.available():
            offered.append("flex")
        _available = (*offered, "eager")
    return _available


def forget_available_backends() -> None:
    """Find out again on the next call (after the machine's compiler changed, in tests)."""
    global _available
    _available = None


def check_backend(name: str) -> None:
    """ValueError unless ``name`` is a backend this machine offers."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"ReformerConfig.attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name not in available_backends():
        why = "no C compiler builds the compiled core" if name == "native" else "torch has no FlexAttention"
        raise ValueError(f"ReformerConfig.attention_backend {name!r} is not available on this machine ({why}); "
                         f"available: {available_backends()}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections of x compute in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def choose_core(setting: str, x: torch.Tensor, band: Band, dropout: float, key_padding: bool = False,
                training: bool = False) -> str:
    """The core ("native", "flex" or "eager") that attends over x (batch, length, d) with ``band``.

    dropout: the attention dropout in force for this call (0 in evaluation); key_padding: a local layer
    given a padding mask; training: the layer is in training mode (a backward will follow). Raises
    ValueError where ``setting`` names a core that cannot serve the call.
    """
    if setting == "eager" or band.rule.startswith("anchor"):
        if setting in ("native", "flex"):
            raise ValueError(f"attention_backend {setting!r} serves lsh_window='bucket' models only; the anchors' "
                             "chunk window runs on the eager core")
        return "eager"
    dtype, device = compute_dtype(x), x.device.type
    local_padding = key_padding and band.rule == "local"
    native_misses = [reason for reason, missing in (
        (f"the CPU (this is {device})", device != "cpu"),
        (f"float32 or float64 (this is {dtype})", dtype not in NATIVE_DTYPES),
        ("no attention dropout", bool(dropout)),
        ("local layers without padding keys", local_padding),
        ("a C compiler", "native" not in available_backends()),
    ) if missing]
    flex_misses = [reason for reason, missing in (
        ("no attention dropout", bool(dropout)),
        ("evaluation on the CPU (FlexAttention has no backward there)", training and device == "cpu"),
        ("torch's FlexAttention", "flex" not in available_backends()),
    ) if missing]
    if setting == "native":
        if native_misses:
            raise ValueError(f"attention_backend 'native' needs {', '.join(native_misses)}")
        return "native"
    if setting == "flex":
        if flex_misses:
            raise ValueError(f"attention_backend 'flex' needs {', '.join(flex_misses)}")
        return "flex"
    if setting != "auto":
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {setting!r}")
    if device == "cpu" and not native_misses:
        return "native"
    if device == "cuda" and not flex_misses:
        return "flex"
    return "eager"


def lsh_attention(h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor, rotations: torch.Tensor,
                  n_buckets: int | tuple[int, int], band: Band, key_valid: torch.Tensor | None, dropout: float,
                  dropout_seed: int, core: str) -> torch.Tensor:
    """Shared-QK LSH attention with the bucket window: hash -> sort -> attend -> unsort -> combine rounds.

    h: (batch, length, d_model), length a multiple of the chunk; w_qk, w_v: (heads * d_head, d_model);
    rotations: (heads, d_head, rounds, width); key_valid: (batch, length) bool or None; dropout: in force
    for this call. Returns (batch, length, heads * d_head).
    """
    heads = rotations.shape[0]
    if core == "flex":
        qk, v = (split_heads(torch.nn.functional.linear(h, w), heads) for w in (w_qk, w_v))
        buckets = hash_with_padding(hashing_vectors(qk, h, w_qk), rotations, n_buckets, key_valid)
        return merge_heads(flex.lsh_attention(qk, v, buckets, band, key_valid))
    # The projections for hashing and forward's rounds (not stored: backward projects again).
    if core == "native":
        with torch.no_grad():
            qk, v = split_pairs(native_ops.project_pairs(h, w_qk, w_v, heads), heads)
        factors = list(n_buckets) if isinstance(n_buckets, tuple) else [n_buckets]
        buckets = with_padding(native_ops.hash_buckets(qk, rotations, factors), n_buckets, key_valid)
        return native_ops.lsh_bucket_attention(h, w_qk, w_v, qk, v, buckets, key_valid, band.chunk_length, band.before,
                                               band.after, band.causal)[0]
    qk, v = split_pairs(project_pairs(h, w_qk, w_v, heads), heads)
    buckets = hash_with_padding(hashing_vectors(qk, h, w_qk), rotations, n_buckets, key_valid)
    # Keep the rounds only where a backward will read them (grad mode is off inside forward).
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (h, w_qk, w_v))
    keep = differentiable and keep_rounds(qk, buckets.shape[2], band)
    out = EagerLSH.apply(h, w_qk, w_v, qk, v, buckets, key_valid, band, dropout, dropout_seed, keep)
    return out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, key_valid: torch.Tensor | None,
                    dropout: float, dropout_seed: int, core: str) -> torch.Tensor:
    """Attention within a band of neighbouring chunks. q, k, v: (batch, heads, length, d), keys scaled
    beforehand, length a multiple of the chunk; key_valid: (batch, length) or None. -> (batch, heads,
    length, d)."""
    if core == "native":
        return native_ops.local_attention(q, k, v, band.chunk_length, band.before, band.after, band.causal)[0]
    if core == "flex":
        return flex.local_attention(q, k, v, band, key_valid)
    batch, heads, length, d = q.shape
    if key_valid is not None:
        key_valid = key_valid[:, None, :].expand(batch, heads, length).reshape(-1)
    spans = local_spans(band.window, batch * heads * length, length, band.causal, key_valid, q.device)
    out, _, _ = interval_attention(q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d), spans, band.window,
                                   dropout, dropout_seed)
    return out.view(batch, heads, length, -1)
