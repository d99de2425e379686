"""The compiled interval core (ops/native: kernels.c, its typed calls and its operators) against the eager
one, at sizes that reach its blocks, tails and vector remainders; and its build: used where a compiler
exists, refused cleanly where none works."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from helpers import tiny
from reformer import ReformerConfig, ReformerLM
from reformer.ops import backend, intervals
from reformer.ops.bands import Band, Window
from reformer.ops.intervals import bucket_spans, local_spans, pad_keys
from reformer.ops.native import build as native
from reformer.ops.native import kernels


@pytest.fixture
def compiled():
    native.library.cache_clear()
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    yield native.library()
    native.library.cache_clear()
    kernels._lib.cache_clear()


def test_the_compiled_core_is_built_where_a_compiler_exists(compiled):
    """Guards against a machine where every test ran on the eager core: auto chooses the compiled one
    wherever it serves the call, and names what it lacks where it does not."""
    assert compiled is not None
    assert "native" in backend.available_backends()
    x, band = torch.zeros(1, 8, 4), Band(Window(4, 1, 0), True, "bucket")
    assert backend.choose_core("auto", x, band, 0.0) == "native"
    assert backend.choose_core("auto", x, band, 0.1) == "eager"                       # attention dropout
    assert backend.choose_core("auto", x.bfloat16(), band, 0.0) == "eager"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backend.choose_core("auto", x, band, 0.0) == "eager"
    local = Band(Window(4, 1, 0), True, "local")
    assert backend.choose_core("auto", x, local, 0.0, key_padding=True) == "eager"
    assert backend.choose_core("eager", x, band, 0.0) == "eager"
    message = r"'native' needs float32 or float64 \(this is torch.bfloat16\), no attention dropout"
    with pytest.raises(ValueError, match=message):
        backend.choose_core("native", x.bfloat16(), band, 0.1)
    with pytest.raises(ValueError, match="local layers without padding keys"):
        backend.choose_core("native", x, local, 0.0, key_padding=True)


def test_the_source_builds_without_a_warning(compiled):
    """-Wall -Wextra, for both ways of threading."""
    for flags in native.THREADING.values():
        result = subprocess.run([native.compiler(), *native.FLAGS, *flags, *map(str, native.SOURCES), "-o",
                                 os.devnull, "-lm"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def _case(kind: str, dtype, seed: int = 0):
    """Spans, rows and gradients of a bucket-window round (chunk 32, 4 sorted sequences of 3,072: each
    thread's part several sub-blocks of 512 rows) or of local attention (chunk 5, one chunk before and
    after, d 7, d_v 3: no whole vectors)."""
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


def _compiled_core(q, k, v, spans, window, d_out, row):
    """interval_forward and interval_backward on the compiled core, through its typed calls."""
    c = window.chunk_length
    out, lse = q.new_empty(q.shape[0], v.shape[-1]), q.new_empty(q.shape[0])
    kernels.forward(q, k, v, spans, c, window.width, window.before * c, lse, out=out)
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernels.backward(q, k, v, d_out, spans, c, window.width, window.before * c, lse, row, *grads)
    return out, lse, spans.has_other, *grads


def _eager_core(q, k, v, spans, window, d_out, row):
    out, lse, has_other = intervals.interval_forward(q, k, v, spans, window)
    return out, lse, has_other, *intervals.interval_backward(q, k, v, spans, window, d_out, row)


@pytest.mark.parametrize("kind", ["bucket", "local"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_compiled_core_equals_the_eager_core(kind, dtype, tolerance, compiled):
    """Outputs, normalisers and the gradients of q, padded keys and values (every padded row)."""
    window, spans, q, k, v, d_out, row = _case(kind, dtype)
    case = (q, k, v, spans, window, d_out, row)
    compiled_results, eager_results = _compiled_core(*case), _eager_core(*case)
    for name, have, want in zip(("out", "lse", "has_other", "d_q", "d_k", "d_v"), compiled_results,
                                eager_results, strict=True):
        if want.dtype == torch.bool:
            assert torch.equal(have, want), name
        else:
            torch.testing.assert_close(have, want, atol=tolerance, rtol=tolerance, msg=name)


def test_compiled_core_is_deterministic_and_thread_count_only_reorders_sums(compiled):
    window, spans, q, k, v, d_out, row = _case("bucket", torch.float64, seed=1)

    def run(threads):
        torch.set_num_threads(threads)
        out, lse, _, *grads = _compiled_core(q, k, v, spans, window, d_out, row)
        return out, lse, *grads

    threads = torch.get_num_threads()
    try:
        first, again, one = run(2), run(2), run(1)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, one, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-13, rtol=0)


def test_kernels_on_torchs_threads_equal_the_kernels_on_threads_of_their_own(compiled, monkeypatch):
    """Where torch runs on libgomp, the kernels run on its threads (and load no runtime of their own); the
    build on POSIX threads cuts the same parts, so both give the same numbers, bit for bit."""
    runtimes = native._openmp_runtimes()
    if not any("libgomp" in path for path in runtimes):
        assert compiled.threading == "pthreads"
        pytest.skip("torch does not run on libgomp here")
    assert compiled.threading == "openmp"
    window, spans, q, k, v, d_out, row = _case("bucket", torch.float32, seed=2)

    def run():
        out, lse, _, *grads = _compiled_core(q, k, v, spans, window, d_out, row)
        return out, lse, *grads

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        on_torchs = run()
        native.library.cache_clear()
        kernels._lib.cache_clear()
        monkeypatch.setattr(native, "THREADING", {"pthreads": native.THREADING["pthreads"]})
        assert native.library().threading == "pthreads"
        on_their_own = run()
    finally:
        torch.set_num_threads(threads)
    assert native._openmp_runtimes() == runtimes
    for name, a, b in zip(("out", "lse", "d_q", "d_k", "d_v"), on_torchs, on_their_own, strict=True):
        assert torch.equal(a, b), name


def _lsh_layer_case(dtype, length=8192, heads=2, rounds=3, d=64, d_model=32):
    """A layer's input and weights, buckets of 64-item chunks (two padded sequences: the last 100
    positions of the second are padding, in buckets of their own) and the gradient to send back."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, length, d_model, generator=g, dtype=dtype, requires_grad=True)
    w_qk, w_v = (torch.randn(heads * d, d_model, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    n_buckets = length // 64
    buckets = torch.randint(0, n_buckets, (2, heads, rounds, length), generator=g)
    buckets[1, :, :, length - 100:] = rounds * n_buckets
    buckets = buckets + n_buckets * torch.arange(rounds)[:, None] * (buckets < rounds * n_buckets)
    buckets[1, :, :, length - 100:] += torch.arange(rounds)[:, None]
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, length - 100:] = False
    d_out = torch.randn(2, length, heads * d, generator=g, dtype=dtype)
    return h, w_qk, w_v, buckets, valid, d_out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_fused_rounds_equal_the_eager_rounds(causal, dtype, tolerance, compiled, monkeypatch):
    """The LSH layer's rounds on the compiled core (reformer::lsh_bucket_attention), which gathers the rows
    of each round itself (each thread's part several sub-blocks, the window rows they share carried over;
    head groups of one) and combines the rounds in position order, against the eager rounds: output and
    the gradients of the input and both weights."""
    from reformer.ops import bucket_attention, fused_rounds
    from reformer.ops.bucket_attention import EagerLSH, project_pairs, split_pairs
    from reformer.ops.native import ops as native_ops

    monkeypatch.setattr(bucket_attention, "HEAD_GROUP_ELEMENTS", 1)
    h, w_qk, w_v, buckets, valid, d_out = _lsh_layer_case(dtype)
    band = Band(Window(64, 1, 0 if causal else 1), causal, "bucket")
    fused_calls = []
    for name in ("forward", "backward"):
        original = getattr(fused_rounds, name)
        monkeypatch.setattr(fused_rounds, name, lambda *a, f=original, name=name: fused_calls.append(name) or f(*a))
    qk, v = split_pairs(project_pairs(h, w_qk, w_v, 2), 2)
    out = native_ops.lsh_bucket_attention(h, w_qk, w_v, qk, v, buckets, valid, 64, 1, 0 if causal else 1, causal)[0]
    fused = (out, *torch.autograd.grad((out * d_out).sum(), (h, w_qk, w_v)))
    assert fused_calls == ["forward"] * 2 + ["backward"] * 2   # one per head
    out = EagerLSH.apply(h, w_qk, w_v, qk, v, buckets, valid, band, 0.0, 0, False).transpose(1, 2).flatten(2)
    eager = (out, *torch.autograd.grad((out * d_out).sum(), (h, w_qk, w_v)))
    for name, have, want in zip(("out", "d_h", "d_w_qk", "d_w_v"), fused, eager, strict=True):
        torch.testing.assert_close(have, want, rtol=tolerance, atol=tolerance * want.abs().max().item(), msg=name)


@pytest.mark.parametrize("n_buckets", [2, 8, 64, (4, 2), (32, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_hashing_equals_the_eager_hashing(n_buckets, dtype, compiled):
    """Bucket ids in one compiled pass against max and min per factor, ties included: zero vectors,
    and vectors whose rotations reach the maximum twice (the first of [xR, -xR] wins)."""
    from reformer.ops import hashing

    g = torch.Generator().manual_seed(0)
    rotations = hashing.draw_rotations(3, 2, 8, 3, n_buckets).to(dtype)
    vectors = torch.randn(2, 2, 700, 8, generator=g, dtype=dtype)
    vectors[:, :, :50] = 0                                    # every column ties
    vectors[:, :, 50:100] = vectors[:, :, 50:100].round()    # small integers: exact ties are common
    rotations_ties = rotations.round()
    for rot in (rotations, rotations_ties):
        compiled_ids = hashing.hash_vectors(vectors, rot, n_buckets, compiled=True)
        assert torch.equal(compiled_ids, hashing.hash_vectors(vectors, rot, n_buckets))


@pytest.mark.parametrize("causal,window", [(True, Window(5, 2, 0)), (False, Window(4, 1, 1)), (True, Window(8, 1, 0))])
@pytest.mark.parametrize("sequences", ["all", "one"])
def test_compiled_round_sort_and_spans_equal_the_eager_ones(causal, window, sequences, compiled):
    """native.round_spans (a counting sort per sequence, spans in the same pass) against sort_by_bucket,
    bucket_spans and make_spans, with padding in buckets of its own, on a strided view of the buckets:
    six sequences (one per thread at a time), and one (sorted on one thread, its spans on all)."""
    from reformer.ops.sorting import row_index, sort_by_bucket, sorted_validity

    g = torch.Generator().manual_seed(0)
    batch, heads, rounds, length = 2, 3, 2, 200
    buckets = torch.randint(0, 9, (batch, heads, rounds, length), generator=g) + 50
    buckets[1, :, :, length - 30:] = 7                       # padding, ids below the real ones
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, length - 30:] = False
    if sequences == "one":                                   # the padded row's first head
        buckets, valid = buckets[1:, :1], valid[1:]
    one_round = buckets[:, :, 1]                             # (B, H, L) view with the rounds' strides
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        positions, order, lo, hi, skip, has_other = kernels.round_spans(one_round, valid, window.chunk_length,
                                                                       window.before, window.after, causal)
        _, want_positions, sorted_buckets = sort_by_bucket(one_round[:, :, None])
        want = bucket_spans(window, sorted_buckets.flatten(), length, causal,
                            sorted_validity(valid, want_positions).flatten())
        assert torch.equal(positions, want_positions)
        assert torch.equal(order, row_index(want_positions, length))
        for name, have, expected in (("lo", lo, want.lo), ("hi", hi, want.hi), ("skip", skip, want.skip),
                                     ("has_other", has_other, want.has_other)):
            assert torch.equal(have, expected), name
        buckets[-1, :, 1, length - 1] = 50                    # a padding item in a real item's bucket
        with pytest.raises(ValueError, match="padding shares a bucket"):
            kernels.round_spans(buckets[:, :, 1], valid, window.chunk_length, window.before, window.after, causal)
    finally:
        torch.set_num_threads(threads)


def test_huge_page_buffers_are_plain_tensors():
    """memory.empty: the shape, dtype and device asked for, writable, starting on a huge page when large,
    and freed with the tensor (no leak of mappings)."""
    from reformer.ops import memory

    like = torch.zeros(1, dtype=torch.float64)
    small = memory.empty((3, 5), like)
    assert small.shape == (3, 5) and small.dtype == torch.float64
    big = memory.empty((1024, 1024), like)
    assert big.shape == (1024, 1024) and big.dtype == torch.float64 and big.is_contiguous()
    if memory._huge_pages_offered():
        assert big.data_ptr() % memory.HUGE_PAGE == 0
    big.fill_(2.0)
    assert big.sum().item() == 2.0 * 1024 * 1024
    out = memory.linear(torch.ones(2, 3, 4), torch.ones(5, 4))
    assert torch.equal(out, torch.full((2, 3, 5), 4.0))
    x, w = torch.randn(2, 300, 64), torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # autocast's dtype, as F.linear gives it
        assert torch.equal(memory.linear(x, w), torch.nn.functional.linear(x, w))
        assert memory.linear(x, w).dtype == torch.bfloat16


@pytest.mark.parametrize("setting,offered", [("always [madvise] never", True), ("always madvise [never]", False)])
def test_huge_pages_are_asked_for_only_where_the_kernel_offers_them(setting, offered, monkeypatch):
    from reformer.ops import memory

    class Setting:
        def __init__(self, path):
            assert str(path) == "/sys/kernel/mm/transparent_hugepage/enabled"

        def read_text(self):
            return setting

    monkeypatch.setattr(memory, "Path", Setting)
    memory._huge_pages_offered.cache_clear()
    try:
        assert memory._huge_pages_offered() is (offered and hasattr(memory.mmap, "MADV_HUGEPAGE"))
    finally:
        memory._huge_pages_offered.cache_clear()


_TORCH_BLOCK = """
import json, os, sys
import reformer, torch
if sys.argv[1] == "offer":
    from reformer.ops import memory
    memory.offer_huge_pages_to_torch()
block = torch.empty(16 << 20)   # 64 MiB from torch's allocator
advised, inside = False, False
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and not fields[0].endswith(":"):
        start, end = (int(x, 16) for x in fields[0].split("-"))
        inside = start <= block.data_ptr() < end
    elif inside and fields[0] == "VmFlags:":
        advised = "hg" in fields[1:]   # the mapping was given MADV_HUGEPAGE
print(json.dumps([os.environ.get("THP_MEM_ALLOC_ENABLE"), advised]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("env,offer", [({}, True), ({}, False), ({"REFORMER_HUGE_PAGES": "0"}, True),
                                       ({"THP_MEM_ALLOC_ENABLE": "0"}, True)])
def test_offering_huge_pages_puts_torchs_large_blocks_on_them(env, offer):
    """offer_huge_pages_to_torch (the CLI calls it first): unless switched off, set by the user, or not
    offered by the kernel, torch then asks for huge pages (MADV_HUGEPAGE) for its large blocks. Importing
    reformer alone asks for nothing."""
    from reformer.ops import memory

    environment = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "REFORMER_HUGE_PAGES")}
    result = subprocess.run([sys.executable, "-c", _TORCH_BLOCK, "offer" if offer else "import"],
                            env={**environment, **env}, capture_output=True, text=True, check=True, timeout=300)
    value, advised = json.loads(result.stdout)
    asked = offer and not env and memory._huge_pages_offered()
    assert value == ("1" if asked else env.get("THP_MEM_ALLOC_ENABLE"))
    assert advised is asked


def test_item_rows_refuse_to_write_into_a_copy():
    from reformer.ops.fused_rounds import item_rows

    x = torch.zeros(1, 2, 8, 6)[..., ::2]   # rows that are not whole in memory
    positions = torch.arange(8).expand(1, 2, 8)
    assert item_rows(x, positions).index.shape == (16,)
    with pytest.raises(ValueError, match="rows to write"):
        item_rows(x, positions, written=True)


def test_item_rows_reuse_the_index_of_rows_laid_out_alike():
    """Side by side in one buffer (the backward's qk|v rows), two heads' tensors share their rows' offsets;
    a tensor laid out otherwise, or one that is not in place, gets its own."""
    from reformer.ops.fused_rounds import item_rows
    from reformer.ops.layout import heads_rows

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2 * 10, 2 * 3 * 4, generator=g)            # (B L, [qk | v] of 3 heads x 4)
    qk, v = (heads_rows(part, 2, 3) for part in rows.split(12, dim=1))
    positions = torch.stack([torch.randperm(10, generator=g) for _ in range(6)]).view(2, 3, 10)
    want = v.gather(2, positions[..., None].expand(-1, -1, -1, 4)).reshape(-1, 4)

    def read(r):
        return r.base.flatten()[r.index[:, None] + torch.arange(4)]

    q_rows = item_rows(qk, positions)
    v_rows = item_rows(v, positions, like=(qk, q_rows))
    assert v_rows.index is q_rows.index
    assert torch.equal(read(v_rows), want)
    other = v.contiguous()                                         # another layout: an index of its own
    assert item_rows(other, positions, like=(qk, q_rows)).index is not q_rows.index
    assert torch.equal(read(item_rows(other, positions, like=(qk, q_rows))), want)
    copied = torch.zeros(2, 3, 10, 8)[..., ::2]                    # not in place: never borrows an index
    copied_rows = item_rows(copied, positions)
    assert item_rows(copied, positions, like=(copied, copied_rows)).index is not copied_rows.index


def test_the_eager_backend_never_calls_the_compiled_core(compiled, monkeypatch):
    """attention_backend="eager" is the one switch: nothing reaches the kernels."""
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled core was called")

    for name in ("forward", "backward", "scatter_gradients", "hash_buckets", "round_spans"):
        monkeypatch.setattr(kernels, name, refuse)
    torch.manual_seed(0)
    model = ReformerLM(tiny(attn_layers=("lsh", "local"), attention_backend="eager")).train()
    model.loss(torch.randint(0, 64, (2, 40))).backward()
    with pytest.raises(AssertionError, match="compiled core was called"):
        ReformerLM(tiny(attn_layers=("lsh", "local"))).loss(torch.randint(0, 64, (2, 40)))


def test_a_compiler_that_fails_leaves_the_eager_core_and_says_so(monkeypatch, tmp_path, caplog):
    native.library.cache_clear()
    backend.forget_available_backends()
    monkeypatch.setenv("CC", "false")   # exists everywhere, compiles nothing
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    try:
        with caplog.at_level(logging.WARNING, logger="reformer.ops.native.build"):
            assert native.library() is None
        assert "attention_backend 'native' is not available" in caplog.text
        assert not list(tmp_path.rglob("*.so"))
        assert "native" not in backend.available_backends()
        with pytest.raises(ValueError, match="attention_backend 'native' is not available on this machine"):
            ReformerConfig(attention_backend="native")
        x = torch.zeros(1, 8, 4)
        assert backend.choose_core("auto", x, Band(Window(4, 1, 0), True, "bucket"), 0.0) == "eager"
    finally:
        native.library.cache_clear()
        backend.forget_available_backends()
        kernels._lib.cache_clear()


BOUNDARY_CASES = r'''
import dataclasses, torch
from reformer.ops.bands import Window
from reformer.ops.intervals import local_spans, pad_keys
from reformer.ops.native import kernels, ops

torch.manual_seed(0)
n, d, chunk = 64, 8, 8
window = Window(chunk, 1, 0)
spans = local_spans(window, n, n, True, None, torch.device("cpu"))
q, k, v = torch.randn(n, d), pad_keys(torch.randn(n, d), window), pad_keys(torch.randn(n, d), window)
lse, out = torch.empty(n), torch.empty(n, d)

def forward(**change):
    args = dict(q=q, k=k, v=v, spans=spans, chunk=chunk, width=window.width, pad=chunk, lse=lse, out=out)
    args.update(change)
    kernels.forward(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("spans"), args.pop("chunk"),
                    args.pop("width"), args.pop("pad"), args.pop("lse"), out=args.pop("out"))

def spans_with(**values):
    return dataclasses.replace(spans, **{name: torch.full((n,), value, dtype=torch.int64)
                                         for name, value in values.items()})

cases = {
    "output buffer too small": lambda: forward(out=torch.empty(3, d)),
    "lse too small": lambda: forward(lse=torch.empty(3)),
    "chunk 0": lambda: forward(chunk=0),
    "chunk not dividing n": lambda: forward(chunk=7),
    "spans past the window": lambda: forward(spans=spans_with(hi=10_000)),
    "negative spans": lambda: forward(spans=spans_with(lo=-5_000)),
    "empty spans": lambda: forward(spans=spans_with(lo=3, hi=3)),
    "skip past the window": lambda: forward(spans=spans_with(skip=1 << 40)),
    "keys too short": lambda: forward(k=torch.randn(5, d)),
    "integer queries": lambda: forward(q=torch.ones(n, d, dtype=torch.int64)),
    "validity mask of the wrong length": lambda: kernels.round_spans(
        torch.zeros(1, 1, n, dtype=torch.int64), torch.ones(1, n // 2, dtype=torch.bool), chunk, 1, 0, True),
    "bucket ids far apart": lambda: kernels.round_spans(
        torch.tensor([[[-(2**62)] * (n // 2) + [2**62] * (n // 2)]]), None, chunk, 1, 0, True),
    "length not a chunk multiple": lambda: kernels.round_spans(torch.zeros(1, 1, n - 3, dtype=torch.int64), None,
                                                                chunk, 1, 0, True),
    "row offsets past their tensor": lambda: kernels.forward(
        kernels.Rows(q, torch.full((n,), 10**9, dtype=torch.int64), d), None,
        kernels.Rows(q, torch.zeros(n, dtype=torch.int64), d), spans, chunk, window.width, chunk, lse, out=out,
        k_scale=torch.ones(n)),
    "operator: local attention at a length the chunk does not divide": lambda: ops.local_attention(
        torch.randn(1, 1, 60, d), torch.randn(1, 1, 60, d), torch.randn(1, 1, 60, d), chunk, 1, 0, True),
    "operator: hash_buckets with too few rotation columns": lambda: ops.hash_buckets(
        torch.randn(1, 1, n, d), torch.randn(1, d, 1, 1), [8]),
}
for name, case in cases.items():
    try:
        case()
    except (ValueError, RuntimeError) as error:
        print(f"{name}: {type(error).__name__}")
    else:
        print(f"{name}: accepted")
'''


def test_no_argument_crashes_the_process_at_the_c_boundary(compiled, tmp_path):
    """Bad shapes, sizes, chunks and index ranges handed to the kernels raise; none segfaults (run in a child
    process, so that a crash is a failed test and not a dead test run)."""
    script = tmp_path / "boundary.py"
    script.write_text(BOUNDARY_CASES)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the process died ({result.returncode}): {result.stdout}{result.stderr[-2000:]}"
    outcomes = dict(line.rsplit(": ", 1) for line in result.stdout.splitlines())
    assert len(outcomes) == 16
    assert {name for name, outcome in outcomes.items() if outcome == "accepted"} == set(), outcomes
    assert all(outcome == "ValueError" for name, outcome in outcomes.items() if not name.startswith("operator")), \
        outcomes
