"""The compiled interval core (native.py, interval_kernels.c) against the eager one, at sizes that reach
its blocks, tails and vector remainders; and its build: used where a compiler exists, refused cleanly
where none works."""

import logging

import pytest
import torch

from reformer import intervals, native
from reformer.intervals import Window, bucket_spans, local_spans, pad_keys


@pytest.fixture
def compiled():
    native.library.cache_clear()
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    yield native.library()
    native.library.cache_clear()


def test_the_compiled_core_is_built_where_a_compiler_exists(compiled):
    """Guards against a silent fallback: every other test would still pass on the eager core."""
    assert compiled is not None
    assert intervals.native_core(torch.zeros(1), 0.0)
    assert not intervals.native_core(torch.zeros(1), 0.1)                      # dropout: eager
    assert not intervals.native_core(torch.zeros(1, dtype=torch.bfloat16), 0.0)


def _case(kind: str, dtype, seed: int = 0):
    """Spans, rows and gradients of a bucket-window round (chunk 32, 4 sorted sequences of 3,072: three
    blocks of 4,096 rows) or of local attention (chunk 5, one chunk before and after, d 7, d_v 3: no
    whole vectors)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bucket":
        window, length, sequences, d, d_v = Window(32, 2, 0), 3072, 4, 64, 64
        buckets = torch.randint(0, 90, (sequences, length), generator=g).sort(dim=-1).values
        spans = bucket_spans(window, buckets.flatten(), length, causal=True)
    else:
        window, length, sequences, d, d_v = Window(5, 1, 1), 1000, 5, 7, 3
        spans = local_spans(window, sequences * length, length, causal=False)
    n = sequences * length
    q = torch.randn(n, d, generator=g, dtype=dtype)
    k = q / q.norm(dim=-1, keepdim=True) * 0.3 + 0.1 * torch.randn(n, d, generator=g, dtype=dtype)
    v = torch.randn(n, d_v, generator=g, dtype=dtype)
    d_out = torch.randn(n, d_v, generator=g, dtype=dtype)
    row = torch.randn(n, generator=g, dtype=dtype)
    return window, spans, q, pad_keys(k, window), pad_keys(v, window), d_out, row


def _both(kind, dtype, monkeypatch):
    window, spans, q, k, v, d_out, row = _case(kind, dtype)
    results = []
    for use in (True, False):
        monkeypatch.setattr(intervals, "native_core", lambda *args, use=use, **kwargs: use)
        out, lse, has_other = intervals.interval_forward(q, k, v, spans, window)
        grads = intervals.interval_backward(q, k, v, spans, window, d_out, row, lse=lse)
        results.append((out, lse, has_other, *grads))
    return results


@pytest.mark.parametrize("kind", ["bucket", "local"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_compiled_core_equals_the_eager_core(kind, dtype, tolerance, compiled, monkeypatch):
    """Outputs, normalisers and the gradients of q, padded keys and values (every padded row)."""
    compiled_results, eager_results = _both(kind, dtype, monkeypatch)
    for name, have, want in zip(("out", "lse", "has_other", "d_q", "d_k", "d_v"), compiled_results,
                                eager_results):
        if want.dtype == torch.bool:
            assert torch.equal(have, want), name
        else:
            torch.testing.assert_close(have, want, atol=tolerance, rtol=tolerance, msg=name)


def test_compiled_core_is_deterministic_and_thread_count_only_reorders_sums(compiled):
    window, spans, q, k, v, d_out, row = _case("bucket", torch.float64, seed=1)
    n = q.shape[0]

    def run(threads):
        torch.set_num_threads(threads)
        out, lse = torch.empty(n, v.shape[1], dtype=q.dtype), torch.empty(n, dtype=q.dtype)
        native.forward(q, k, v, spans.lo, spans.hi, spans.skip, window.chunk_length, window.width, out, lse)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        native.backward(q, k, v, spans.lo, spans.hi, spans.skip, window.chunk_length, window.width, d_out, lse,
                        row, *grads)
        return out, lse, *grads

    threads = torch.get_num_threads()
    try:
        first, again, one = run(2), run(2), run(1)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, one):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-13, rtol=0)


def test_native_can_be_switched_off(monkeypatch):
    native.library.cache_clear()
    monkeypatch.setenv("REFORMER_NATIVE", "0")
    try:
        assert native.library() is None
        assert not intervals.native_core(torch.zeros(1), 0.0)
    finally:
        native.library.cache_clear()


def test_a_compiler_that_fails_leaves_the_eager_core_and_says_so(monkeypatch, tmp_path, caplog):
    native.library.cache_clear()
    monkeypatch.setenv("CC", "false")   # exists everywhere, compiles nothing
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    try:
        with caplog.at_level(logging.WARNING, logger="reformer.native"):
            assert native.library() is None
        assert "running it eagerly" in caplog.text
        assert not list(tmp_path.rglob("*.so"))
    finally:
        native.library.cache_clear()
