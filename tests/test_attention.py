"""The attention layers against plain full attention, and the properties of the banded core."""

import pytest
import torch

from helpers import full_shared_qk_attention, tiny
from reformer.nn.attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
from reformer.ops.banded import banded_attention
from reformer.ops.bands import Band, Window


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", ["bucket", "chunk"])
@pytest.mark.parametrize("length", [5, 20, 32])
def test_lsh_with_one_bucket_and_one_chunk_is_full_shared_qk_attention(causal, window, length):
    """The claim is algebraic (hashing, sorting, masking and the rounds' combination reduce to full
    attention), so it is held in float64 to 1e-12: in float32 the two orders of operations round apart by
    amounts that depend on the CPU's kernels, not on the algorithm."""
    torch.manual_seed(0)
    cfg = tiny(n_buckets=1, chunk_length=32, n_hashes=3, causal=causal, lsh_window=window)
    layer = LSHSelfAttention(cfg).eval().double()
    x = torch.randn(2, length, cfg.d_model, dtype=torch.float64)
    expected = full_shared_qk_attention(layer, x, causal)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", ["bucket", "chunk"])
def test_local_attention_covering_the_sequence_is_full_attention(causal, window):
    torch.manual_seed(0)
    cfg = tiny(chunk_length=16, causal=causal, lsh_window=window)
    local = LocalSelfAttention(cfg).eval()
    full = FullSelfAttention(cfg).eval()
    full.load_state_dict(local.state_dict())
    x = torch.randn(2, 13, cfg.d_model)
    torch.testing.assert_close(local(x), full(x), atol=1e-5, rtol=0)


def test_local_attention_sees_exactly_its_band():
    """Without wrap-around, a causal query at t sees t - (t mod c) - c ... t and nothing else."""
    c = 4
    band = Band(Window(c, 1, 0), True, "local")
    n, d = 16, 16
    # One-hot values: the output row is the attention distribution over positions.
    v = torch.eye(n)[None, None]
    q = torch.zeros(1, 1, n, d)
    out, _, _ = banded_attention(q, torch.zeros(1, 1, n, d), v, torch.arange(n)[None, None], band)
    for t in range(n):
        start = max(0, (t // c - 1) * c)
        expected = torch.zeros(n)
        expected[start:t + 1] = 1.0 / (t + 1 - start)
        torch.testing.assert_close(out[0, 0, t], expected)


def test_bucket_window_attends_only_to_earlier_members_of_its_bucket():
    c, n = 4, 16
    band = Band(Window(c, 1, 0), True, "bucket")
    buckets = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    order = torch.argsort(buckets * n + torch.arange(n))
    positions = order[None, None]
    v = torch.eye(n)[None, None][:, :, order]
    zeros = torch.zeros(1, 1, n, 8)
    out, _, has_other = banded_attention(zeros, zeros, v, positions, band, buckets=buckets[order][None, None])
    for i, t in enumerate(order.tolist()):
        earlier = [s for s in range(t) if buckets[s] == buckets[t]][-c:]
        expected = torch.zeros(n)
        expected[earlier or [t]] = 1.0 / max(1, len(earlier))
        torch.testing.assert_close(out[0, 0, i], expected)
        assert bool(has_other[0, 0, i]) == bool(earlier)


def test_query_with_only_itself_returns_its_value_exactly():
    """Position 0 of a causal LSH layer has no key but itself: its output is its value.

    Exactly up to float32 rounding of the output projection (the anchors are off by 0.2% here)."""
    torch.manual_seed(0)
    cfg = tiny(n_hashes=4, causal=True)
    layer = LSHSelfAttention(cfg).eval()
    x = torch.randn(1, 24, cfg.d_model) * 10
    out = layer(x)
    value = layer.out(layer.v(x[:, :1]))
    torch.testing.assert_close(out[:, 0], value[:, 0], rtol=1e-6, atol=1e-6)


def clustered_inputs(generator, n_clusters=16, per_cluster=16, d=32, noise=0.3):
    centres = torch.randn(n_clusters, d, generator=generator)
    x = centres.repeat_interleave(per_cluster, 0) + noise * torch.randn(n_clusters * per_cluster, d,
                                                                        generator=generator)
    return x[torch.randperm(len(x), generator=generator)][None]


def test_more_hash_rounds_approximate_full_attention_better():
    errors = {}
    for n_hashes in (1, 2, 4, 8):
        total = 0.0
        for seed in range(6):
            g = torch.Generator().manual_seed(seed)
            cfg = tiny(n_hashes=n_hashes, n_buckets=16, chunk_length=16, causal=False, hash_seed=seed)
            layer = LSHSelfAttention(cfg).eval()
            with torch.no_grad():  # a sharp, well-conditioned attention: q = 4 x
                layer.qk.weight.copy_(4 * torch.eye(32))
                layer.v.weight.copy_(torch.eye(32))
                layer.out.weight.copy_(torch.eye(32))
                x = clustered_inputs(g)
                exact = full_shared_qk_attention(layer, x, causal=False)
                total += ((layer(x) - exact).norm() / exact.norm()).item()
        errors[n_hashes] = total / 6
    print("relative error by n_hashes:", errors)
    assert errors[1] > errors[2] > errors[4] > errors[8]
    assert errors[8] < 0.5 * errors[1]


@pytest.mark.parametrize("kind", [LSHSelfAttention, LocalSelfAttention, FullSelfAttention])
@pytest.mark.parametrize("causal", [True, False])
def test_layers_ignore_padding_keys(kind, causal):
    torch.manual_seed(0)
    layer = kind(tiny(causal=causal)).eval()
    x = torch.randn(1, 11, 32)
    padded = torch.cat([x, torch.randn(1, 6, 32)], dim=1)
    valid = torch.zeros(1, 17, dtype=torch.bool)
    valid[:, :11] = True
    torch.testing.assert_close(layer(padded, valid)[:, :11], layer(x), atol=1e-5, rtol=0)
    assert layer(padded, valid).isfinite().all()


BANDS = {
    "causal-bucket": Band(Window(4, 1, 0), True, "bucket"),
    "encoder-bucket": Band(Window(4, 1, 1), False, "bucket"),
    "anchor-chunk": Band(Window(4, 1, 0), True, "anchor-lsh"),
    "local": Band(Window(4, 1, 1), False, "local"),
    "local-causal-wrap": Band(Window(4, 2, 0), True, "anchor-local"),
}


@pytest.mark.parametrize("name,dropout", [(name, p) for name in sorted(BANDS) for p in (0.0, 0.3)
                                          if not (BANDS[name].anchor_masks and p)])   # anchors: inference
def test_banded_core_gradients_are_exact(name, dropout):
    """The hand-written backward of the core against finite differences (float64)."""
    band = BANDS[name]
    g = torch.Generator().manual_seed(0)
    n = 16
    q, k, v = (torch.randn(1, 2, n, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    positions = torch.randperm(n, generator=g)[None, None].expand(1, 2, n)
    buckets = torch.randint(0, 2, (1, 2, n), generator=g)
    valid = torch.rand(1, 2, n, generator=g) > 0.2

    def run(q, k, v):
        torch.manual_seed(1)   # the same dropout mask on every evaluation
        out, lse, _ = banded_attention(q, k, v, positions, band, buckets=buckets, key_valid=valid,
                                       dropout=dropout, training=True)
        return out, lse

    assert torch.autograd.gradcheck(run, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def _random_rounds(seed, rounds=3, n=32, d_model=6, heads=2, d=4, dtype=torch.float64):
    """A layer's input, its projection weights, buckets (padding in its own) and validity."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, d_model, generator=g, dtype=dtype, requires_grad=True)
    w_qk, w_v = (torch.randn(heads * d, d_model, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    buckets = torch.randint(0, 3, (2, heads, rounds, n), generator=g)
    buckets[1, :, :, n - 5:] = 3                                  # padding bucket of the second sequence
    buckets = buckets + 4 * torch.arange(rounds)[:, None]         # ids unique across rounds
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, n - 5:] = False
    return h, w_qk, w_v, buckets, valid


def _rounds(h, w_qk, w_v, buckets, band, valid, core, keep=False, dropout=0.0):
    """The bucket window's rounds from given buckets, as backend.lsh_attention runs them after hashing:
    the compiled core's operator, or the eager core's autograd function (``keep``: forward keeps the
    rounds for backward). -> (B, L, heads * d)."""
    from reformer.ops.bucket_attention import EagerLSH, project_pairs, split_pairs
    from reformer.ops.native import ops as native_ops

    heads = buckets.shape[1]
    qk, v = split_pairs(project_pairs(h, w_qk, w_v, heads), heads)
    if core == "native":
        return native_ops.lsh_bucket_attention(h, w_qk, w_v, qk, v, buckets, valid, band.chunk_length, band.before,
                                               band.after, band.causal)[0]
    out = EagerLSH.apply(h, w_qk, w_v, qk, v, buckets, valid, band, dropout, 7 if dropout else 0, keep)
    return out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("one_head_at_a_time", [False, True])
@pytest.mark.parametrize("keep_rounds", [True, False])
def test_round_by_round_equals_all_rounds_at_once(causal, one_head_at_a_time, keep_rounds, monkeypatch, core):
    """The layer's path (projections inside, rounds one at a time on the interval core) against the
    masked core on all rounds sorted together, with autograd through plain projections; backward
    reading the rounds forward kept (short lengths) or recomputing them (long ones)."""
    from reformer.ops import bucket_attention
    from reformer.ops.keys import normalize_keys
    from reformer.ops.layout import merge_heads, split_heads
    from reformer.ops.lsh import combine_rounds
    from reformer.ops.sorting import gather_items, sort_by_bucket, unsort

    if core == "native" and keep_rounds:
        pytest.skip("keeping the rounds is the eager core's trade")
    if one_head_at_a_time:   # as at long lengths: head groups of one, each projected on its own
        monkeypatch.setattr(bucket_attention, "HEAD_GROUP_ELEMENTS", 1)
    band = Band(Window(4, 1, 0 if causal else 1), causal, "bucket")
    h, w_qk, w_v, buckets, valid = _random_rounds(0)
    q, v = split_heads(h @ w_qk.T, 2), split_heads(h @ w_v.T, 2)
    k = normalize_keys(q)
    order, positions, sorted_buckets = sort_by_bucket(buckets)
    out, lse, has_other = banded_attention(
        gather_items(q, positions), gather_items(k, positions), gather_items(v, positions), positions, band,
        buckets=sorted_buckets, key_valid=valid[:, None, :].expand(-1, 2, -1).gather(2, positions))
    out, lse, has_other = unsort(order, out, lse, has_other)
    shape = (2, 2, 3, 32)
    expected = merge_heads(combine_rounds(out.reshape(*shape, -1), lse.reshape(shape), has_other.reshape(shape)))
    got = _rounds(h, w_qk, w_v, buckets, band, valid, core, keep=keep_rounds)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    g = torch.randn_like(got)
    grads = [torch.autograd.grad((t * g).sum(), (h, w_qk, w_v)) for t in (expected, got)]
    for want, have in zip(*grads, strict=True):
        torch.testing.assert_close(have, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("keep_rounds", [True, False])
def test_round_by_round_gradients_are_exact(dropout, keep_rounds, core):
    if core == "native" and (keep_rounds or dropout):
        pytest.skip("keeping the rounds and dropout are the eager core's")
    band = Band(Window(4, 1, 0), True, "bucket")
    h, w_qk, w_v, buckets, valid = _random_rounds(1, n=16)

    def run(h, w_qk, w_v):
        return _rounds(h, w_qk, w_v, buckets, band, valid, core, keep=keep_rounds, dropout=dropout)

    assert torch.autograd.gradcheck(run, (h, w_qk, w_v), eps=1e-6, atol=1e-6, fast_mode=True)
