"""The eager interval core (intervals.py) against the general masked core (banded.py), which it replaces
for our own bands: same outputs, normalisers and gradients, and clear errors for spans it cannot serve.
(test_native.py holds the compiled core to the eager one.)"""

import pytest
import torch

from reformer.ops.banded import banded_attention
from reformer.ops.bands import Band, Window
from reformer.ops.intervals import bucket_spans, interval_attention, local_spans, make_spans


def _inputs(seed, batch=2, heads=3, length=32, d=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, d, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(3)]


def _local(q, k, v, window: Window, causal: bool, valid):
    batch, heads, length, d = q.shape
    flat_valid = None if valid is None else valid[:, None, :].expand(batch, heads, length).reshape(-1)
    spans = local_spans(window, batch * heads * length, length, causal, flat_valid)
    out, lse, has_other = interval_attention(q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d), spans,
                                             window)
    return out.view(q.shape), lse.view(q.shape[:3]), has_other.view(q.shape[:3])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("before,after,chunk", [(1, 0, 4), (1, 1, 4), (2, 0, 4), (1, 1, 128)])
@pytest.mark.parametrize("padded", [False, True])
def test_local_spans_equal_the_masked_core(causal, before, after, chunk, padded):
    """Chunk 128 with a window of 384 keys takes the comparison path instead of the interval table."""
    length = 32 if chunk == 4 else 256
    q, k, v = _inputs(0, length=length)
    valid = None
    if padded:   # random padding, and a run of it that leaves some queries no key but themselves
        valid = torch.rand(2, length, generator=torch.Generator().manual_seed(1)) > 0.3
        valid[:, 8:20] = False
    band = Band(Window(chunk, before, after), causal, "local")
    expected = banded_attention(q, k, v, torch.arange(length)[None, None], band,
                                key_valid=None if valid is None else valid[:, None, :])
    got = _local(q, k, v, Window(chunk, before, after), causal, valid)
    torch.testing.assert_close(got[0], expected[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-12, rtol=0)
    assert torch.equal(got[2], expected[2])
    g = torch.randn_like(q)
    grads = [torch.autograd.grad((out[0] * g).sum() + out[1].sum(), (q, k, v)) for out in (expected, got)]
    for want, have in zip(*grads, strict=True):
        torch.testing.assert_close(have, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_bucket_spans_equal_the_masked_core(causal):
    """One round of LSH's bucket window over a sorted sequence, padding in a bucket of its own."""
    q, k, v = _inputs(2)
    g = torch.Generator().manual_seed(3)
    length, c = 32, 4
    buckets = torch.randint(0, 3, (2, 3, length), generator=g)
    buckets[1, :, -5:] = 3
    positions = torch.arange(length).expand(2, 3, length)
    order = torch.argsort(buckets * length + positions, dim=-1)
    sorted_buckets = buckets.gather(2, order)
    valid = torch.ones(2, 3, length, dtype=torch.bool)
    valid[1, :, -5:] = False
    sorted_valid = valid.gather(2, order)
    band = Band(Window(c, 1, 0 if causal else 1), causal, "bucket")
    expected = banded_attention(q, k, v, order, band, buckets=sorted_buckets, key_valid=sorted_valid)
    window = band.window
    spans = bucket_spans(window, sorted_buckets.flatten(), length, causal, sorted_valid.flatten())
    out, lse, has_other = interval_attention(q.reshape(-1, 5), k.reshape(-1, 5), v.reshape(-1, 5), spans,
                                             window)
    torch.testing.assert_close(out.view(q.shape), expected[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(lse.view(q.shape[:3]), expected[1], atol=1e-12, rtol=0)
    assert torch.equal(has_other.view(q.shape[:3]), expected[2])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_interval_core_gradients_are_exact(dropout):
    """The hand-written backward against finite differences, with padding keys and dropout."""
    q, k, v = (t.detach()[:1, :2, :16, :3].requires_grad_() for t in _inputs(4))
    valid = torch.rand(1, 16, generator=torch.Generator().manual_seed(5)) > 0.3
    window = Window(4, 1, 0)
    spans = local_spans(window, 32, 16, True, valid[:, None, :].expand(1, 2, 16).reshape(-1))

    def run(q, k, v):   # the same dropout masks (seed 1) on every evaluation
        out, lse, _ = interval_attention(q.reshape(-1, 3), k.reshape(-1, 3), v.reshape(-1, 3), spans, window,
                                         dropout=dropout, seed=1)
        return out, lse

    assert torch.autograd.gradcheck(run, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_spans_that_leave_the_window_are_refused():
    window = Window(4, 1, 0)
    index = torch.arange(16)
    with pytest.raises(ValueError, match="beyond the query's window"):
        make_spans(window, (index - 8).clamp_min(0), index, exclude_self=True)


def test_padding_sharing_a_bucket_with_real_items_is_refused():
    buckets = torch.zeros(8, dtype=torch.long)
    valid = torch.tensor([True] * 6 + [False] * 2)
    with pytest.raises(ValueError, match="padding shares a bucket"):
        bucket_spans(Window(4, 1, 0), buckets, 8, True, valid)
