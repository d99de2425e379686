"""The attention cores on FlexAttention (torch.nn.attention.flex_attention): the backend for CUDA.

LSH with the bucket window: per round, the bucket-sorted rows with the rounds folded into the batch; a
static band BlockMask (a query block sees its own block and the blocks its reach spans before it, and
after it when not causal); a mask_mod that reads the sorted bucket ids (same bucket, within reach, not
the query itself, no padding query); the log-sum-exp to combine the rounds. Keys are the unit-normalised
queries, so the logits need no scale. A row whose only key is itself comes back fully masked (output 0,
lse -inf): it carries no weight in the combination, and a query that saw only itself in every round
returns its own value, as the other cores do.

Local attention: the unsorted rows, the same band, a mask_mod for the window, causality and padding keys.

On CUDA flex_attention runs compiled (torch.compile of flex_attention: the fused kernel); elsewhere it
runs eagerly, which computes the whole score matrix and has no backward on the CPU: there this backend is
a forward-only reference (the tests hold it equal to the eager core).
"""

from __future__ import annotations

import functools
import warnings

import torch

from .bands import Band
from .keys import key_scale
from .sorting import sort_by_bucket

BLOCK = 128   # the BlockMask's block: rows of queries (and of keys) the kernel takes at a time


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _attend(q, k, v, block_mask):
    """flex_attention's output and natural log-sum-exp, scale 1 (the keys are scaled beforehand)."""
    from torch.nn.attention import flex_attention as flex

    if q.device.type == "cuda":
        function = _compiled()
    else:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("FlexAttention has no backward on the CPU: attention_backend 'flex' runs there "
                             "for inference only (use 'auto', 'native' or 'eager' to train)")
        function = flex.flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")   # the CPU's reference path
        if hasattr(flex, "AuxRequest"):
            out, aux = function(q, k, v, block_mask=block_mask, scale=1.0, return_aux=flex.AuxRequest(lse=True))
            return out, aux.lse
        return function(q, k, v, block_mask=block_mask, scale=1.0, return_lse=True)


@functools.lru_cache(maxsize=64)
def _band_blocks(length: int, back: int, ahead: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_num_blocks (1, 1, n) and kv_indices (1, 1, n, n) int32 of the static band: query block i sees key
    blocks i - ceil(back / BLOCK) ... i + ceil(ahead / BLOCK), within the sequence."""
    n = -(-length // BLOCK)
    before, after = -(-back // BLOCK), -(-ahead // BLOCK)
    first = (torch.arange(n, device=device) - before).clamp_min(0)
    last = (torch.arange(n, device=device) + after).clamp_max(n - 1)
    count = last - first + 1
    indices = (first[:, None] + torch.arange(n, device=device)).clamp_max(n - 1)
    return count.to(torch.int32).view(1, 1, n), indices.to(torch.int32).view(1, 1, n, n)


def _block_mask(length: int, back: int, ahead: int, mask_mod, device: torch.device):
    from torch.nn.attention.flex_attention import BlockMask

    count, indices = _band_blocks(length, back, ahead, device)
    return BlockMask.from_kv_blocks(count, indices, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(length, length))


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, band: Band,
                  valid: torch.Tensor | None) -> torch.Tensor:
    """qk, v (B, H, L, d); buckets (B, H, rounds, L) unique across rounds, padding in buckets of its own
    (hashing.hash_with_padding); valid (B, L) or None. Returns (B, H, L, d)."""
    batch, heads, rounds, length = buckets.shape
    d = qk.shape[-1]
    reach_back, reach_ahead = band.before * band.chunk_length, band.after * band.chunk_length
    _, positions, sorted_buckets = sort_by_bucket(buckets.reshape(batch, heads * rounds, 1, length))
    positions = positions.view(batch, heads, rounds, length)
    sorted_buckets = sorted_buckets.view(batch, heads, rounds, length)

    def fold(x):   # (B, H, R, L, ...) -> (B R, H, L, ...): rounds in the batch
        return x.transpose(1, 2).reshape(batch * rounds, heads, length, *x.shape[4:])

    def sorted_rows(x):   # x (B, H, L, e) at every round's sorted positions -> (B R, H, L, e)
        index = positions.reshape(batch, heads, rounds * length, 1).expand(-1, -1, -1, x.shape[-1])
        return fold(x.gather(2, index).view(batch, heads, rounds, length, x.shape[-1]))

    scale, _ = key_scale(qk)
    q_sorted = sorted_rows(qk)
    k_sorted = q_sorted * sorted_rows(scale[..., None].to(qk.dtype))
    v_sorted = sorted_rows(v)
    ids = fold(sorted_buckets)
    query_valid = None
    if valid is not None:
        query_valid = fold(valid[:, None, None, :].expand(batch, heads, rounds, length).gather(3, positions))

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (ids[b, h, q_idx] == ids[b, h, kv_idx]) & (q_idx - kv_idx <= reach_back) & (kv_idx != q_idx)
        allowed = allowed & (kv_idx < q_idx if band.causal else kv_idx - q_idx <= reach_ahead)
        return allowed if query_valid is None else allowed & query_valid[b, h, q_idx]

    block_mask = _block_mask(length, reach_back, 0 if band.causal else reach_ahead, mask_mod, qk.device)
    out, lse = _attend(q_sorted, k_sorted, v_sorted, block_mask)       # (B R, H, L, d), (B R, H, L)
    # Back to position order, rounds last: (B, H, L, R)
    undo = torch.empty_like(positions).scatter_(3, positions, torch.arange(length, device=qk.device)
                                                .expand_as(positions))
    out = out.view(batch, rounds, heads, length, d).transpose(1, 2)
    lse = lse.view(batch, rounds, heads, length).transpose(1, 2)
    out = out.gather(3, undo[..., None].expand(-1, -1, -1, -1, d))
    lse = lse.float().gather(3, undo)
    return combine_rounds(out, lse, v)


def combine_rounds(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rounds out (B, H, R, L, d) with their log-sum-exps (B, H, R, L), -inf where the query saw only
    itself, weighted by softmax(lse) over the rounds; a query that saw only itself in every round returns
    its value v (B, H, L, d). The weights never see an all -inf column (no NaN, in forward or backward)."""
    any_other = torch.isfinite(lse).any(dim=2)
    weights = torch.softmax(torch.where(any_other[:, :, None], lse, 0.0), dim=2)
    combined = (out * weights[..., None].to(out.dtype)).sum(dim=2)
    return torch.where(any_other[..., None], combined, v)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band,
                    key_valid: torch.Tensor | None) -> torch.Tensor:
    """q, k, v (B, H, L, d), keys scaled beforehand; key_valid (B, L) or None. Chunks k - before ... k +
    after of each query's chunk k, up to the query when causal. A query with no allowed key (padding in
    a window of padding) returns its own value, as on the interval core. Returns (B, H, L, d)."""
    length, c = q.shape[2], band.chunk_length
    before, after = band.before, band.after

    def mask_mod(b, h, q_idx, kv_idx):
        q_chunk, kv_chunk = q_idx // c, kv_idx // c
        allowed = (kv_chunk >= q_chunk - before) & (kv_chunk <= q_chunk + after)
        if band.causal:
            allowed = allowed & (kv_idx <= q_idx)
        return allowed if key_valid is None else allowed & key_valid[b, kv_idx]

    back, ahead = (before + 1) * c - 1, 0 if band.causal else (after + 1) * c - 1
    out, lse = _attend(q, k, v, _block_mask(length, back, ahead, mask_mod, q.device))
    return torch.where(torch.isfinite(lse)[..., None], out, v)
