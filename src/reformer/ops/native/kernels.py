"""Typed calls into the compiled interval core (kernels.c): one ctypes structure per entry point, filled by
name, and the checks that keep a bad argument from reaching C.

Each structure mirrors its C namesake field by field (ForwardCall, BackwardCall, ScatterCall, HashCall,
RoundSpansCall; DecodeCall and LocalDecodeCall of decode.c, filled by ops/native/decoding.py). The wrappers
check what would make the C code read or write out of bounds (dtypes, devices, contiguity, sizes, and the
range of every index: spans within the window, row offsets within their tensor, orders within the positions)
and raise ValueError naming the argument, so that no argument crashes the process. The range checks are a few
reductions over n indices, next to the O(n x window x d) work of a call.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from .build import library

DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_i64, _ptr, _i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def _fields(spec: str, kind) -> list[tuple[str, object]]:
    return [(name, kind) for name in spec.split()]


class ForwardCall(ctypes.Structure):
    _fields_ = (_fields("n d dv chunk width pad", _i64)
                + _fields("q k k_scale v q_index v_index lo hi skip out lse order has_other acc best norm scores "
                          "final_out out_index total any_other", _ptr) + [("threads", _i32)])


class BackwardCall(ctypes.Structure):
    _fields_ = (_fields("n d dv chunk width pad", _i64)
                + _fields("q k k_scale v g g_scale q_index v_index g_index lo hi skip lse row dq dkp dvp", _ptr)
                + [("threads", _i32)])


class ScatterCall(ctypes.Structure):
    _fields_ = (_fields("n d dv pad", _i64)
                + _fields("q k_scale dq dkp dvp q_index order dq_index dv_index d_qk d_v d_scale", _ptr)
                + [("threads", _i32)])


class HashCall(ctypes.Structure):
    _fields_ = [("x", _ptr), ("sizes", _i64 * 4), ("strides", _i64 * 4), ("out_strides", _i64 * 4), ("out", _ptr),
                ("n_factors", _i64), ("factors", _i64 * 2), ("threads", _i32)]


class RoundSpansCall(ctypes.Structure):
    _fields_ = ([("batch", _i64), ("heads", _i64), ("length", _i64), ("buckets", _ptr), ("strides", _i64 * 3),
                 ("valid", _ptr), ("chunk", _i64), ("before", _i64), ("after", _i64), ("causal", _i32)]
                + _fields("positions order lo hi skip has_other", _ptr) + [("threads", _i32)])


class DecodeCall(ctypes.Structure):
    _fields_ = (_fields("batch heads d rounds width n_factors", _i64) + [("factors", _i64 * 2)]
                + _fields("window n_buckets capacity position", _i64)
                + _fields("kv cache hash ring count out scores rotated rows", _ptr))


class LocalDecodeCall(ctypes.Structure):
    _fields_ = _fields("batch heads d capacity first position", _i64) + _fields("qkv cache out scores", _ptr)


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise ValueError("the compiled interval core is not available on this machine (no C compiler builds "
                         "it): use attention_backend 'eager' or 'auto'")
    for kernel, call in (("interval_forward", ForwardCall), ("interval_backward", BackwardCall),
                         ("scatter_gradients", ScatterCall), ("hash_buckets", HashCall),
                         ("decode_lsh", DecodeCall), ("decode_local", LocalDecodeCall)):
        for name in DTYPES.values():
            function = getattr(lib, f"{kernel}_{name}")
            function.argtypes, function.restype = [ctypes.POINTER(call)], None
    lib.round_spans.argtypes, lib.round_spans.restype = [ctypes.POINTER(RoundSpansCall)], _i32
    return lib


@dataclass
class Rows:
    """Rows the kernels read by item: item i's row (``size`` wide) of ``base`` starts ``index[i]`` elements
    past base's first element. The kernels gather them a block at a time into buffers that stay in cache,
    instead of sorted copies in memory."""

    base: torch.Tensor    # contiguous
    index: torch.Tensor   # (n,) int64
    size: int


def _check(name: str, t: torch.Tensor | None, dtype: torch.dtype, numel: int | None = None) -> int | None:
    """t's address after checking what the kernels assume of it: a contiguous CPU tensor of ``dtype``
    holding at least ``numel`` elements."""
    if t is None:
        return None
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"the compiled interval core takes {name} as a contiguous CPU {dtype} tensor, got a "
                         f"{'contiguous' if t.is_contiguous() else 'non-contiguous'} {t.device.type} {t.dtype} one")
    if numel is not None and t.numel() < numel:
        raise ValueError(f"the compiled interval core needs {numel} elements of {name}, got {t.numel()}")
    return t.data_ptr()


def _check_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """ValueError unless every value of the int64 tensor t lies in [low, high)."""
    if t.numel() and (int(t.min()) < low or int(t.max()) >= high):
        raise ValueError(f"the compiled interval core needs {name} in [{low}, {high}), got values in "
                         f"[{int(t.min())}, {int(t.max())}]")


def _check_spans(spans, width: int, n: int) -> None:
    """Spans within the window: 0 <= lo < hi <= width, skip -1 or a column."""
    for name in ("lo", "hi", "skip"):
        _check(name, getattr(spans, name), torch.int64, n)
    _check_range("lo", spans.lo[:n], 0, width)
    _check_range("hi", spans.hi[:n], 1, width + 1)
    _check_range("skip", spans.skip[:n], -1, width)
    if bool((spans.lo[:n] >= spans.hi[:n]).any()):
        raise ValueError("the compiled interval core needs every span to hold a column (lo < hi)")


def _rows(name: str, x: torch.Tensor | Rows, dtype, n: int, rows: int | None = None):
    """(base address, index address, row width) of n items' rows: Rows, or ``rows`` rows as they lie."""
    if isinstance(x, Rows):
        index = _check(f"{name}'s index", x.index, torch.int64, n)
        _check(name, x.base, dtype)
        _check_range(f"{name}'s row offsets", x.index[:n], 0, x.base.numel() - x.size + 1)
        return x.base.data_ptr(), index, x.size
    if rows is None:
        raise ValueError(f"the compiled interval core reads {name} by index here: pass Rows")
    return _check(name, x, dtype, rows * x.shape[-1]), None, x.shape[-1]


def _kernel(kernel: str, dtype: torch.dtype):
    if dtype not in DTYPES:
        raise ValueError(f"the compiled interval core computes in {sorted(map(str, DTYPES))}, got {dtype}")
    return getattr(_lib(), f"{kernel}_{DTYPES[dtype]}")


def _check_geometry(n: int, chunk: int, width: int, pad: int) -> None:
    if chunk < 1 or n % chunk or width < chunk or width % chunk or not 0 <= pad <= width - chunk:
        raise ValueError(f"the compiled interval core needs a chunk >= 1 dividing n and the window width, and "
                         f"0 <= pad <= width - chunk; got n={n}, chunk={chunk}, width={width}, pad={pad}")


def forward(q, k, v, spans, chunk: int, width: int, pad: int, lse, out=None, k_scale=None, combine=None,
            finish=None) -> None:
    """Span attention of n items in sorted order (intervals.interval_forward), lse (n,) by item.

    Rows as they lie: q (n, d), k and v padded (``pad`` rows in front, n + width - chunk in all). Or by
    index: q and v Rows, k None (shared-QK: the keys are the q rows times k_scale (n,)). Outputs: out
    (n, dv) by item; or, with ``combine`` = (order, has_other, acc, best, norm, scores), the round added
    to the online softmax over rounds in position order (fused_rounds.forward); with ``finish`` =
    (out Rows by position, total, any_other) too (the last round), the softmax finished: the result
    into out's rows, the total normaliser and any_other (no round saw another key: out is v) by position."""
    n, dtype = lse.shape[0], lse.dtype
    _check_geometry(n, chunk, width, pad)
    _check_spans(spans, width, n)
    padded = n + width - chunk
    (q_at, q_index, d), (v_at, v_index, dv) = _rows("q", q, dtype, n, n), _rows("v", v, dtype, n, padded)
    call = ForwardCall(n=n, d=d, dv=dv, chunk=chunk, width=width, pad=pad, q=q_at, q_index=q_index,
                       k=_check("k", k, dtype, padded * d), k_scale=_check("k_scale", k_scale, dtype, n),
                       v=v_at, v_index=v_index, lo=_check("lo", spans.lo, torch.int64, n),
                       hi=_check("hi", spans.hi, torch.int64, n), skip=_check("skip", spans.skip, torch.int64, n),
                       out=_check("out", out, dtype, n * dv), lse=_check("lse", lse, dtype, n),
                       threads=torch.get_num_threads())
    if not isinstance(q, Rows) and k is None:
        raise ValueError("the compiled interval core needs the keys k of queries given as they lie")
    if combine is not None:
        order, has_other, acc, best, norm, scores = combine
        positions = acc.shape[0]
        call.order, call.has_other = _check("order", order, torch.int64, n), _check("has_other", has_other,
                                                                                     torch.bool, n)
        _check_range("order", order[:n], 0, positions)
        call.acc, call.best = _check("acc", acc, dtype, positions * dv), _check("best", best, dtype, positions)
        call.norm, call.scores = _check("norm", norm, dtype, positions), _check("scores", scores, dtype, positions)
        if finish is not None:
            final_out, total, any_other = finish
            call.final_out, call.out_index, _ = _rows("out", final_out, dtype, positions)
            call.total = _check("total", total, dtype, positions)
            call.any_other = _check("any_other", any_other, torch.bool, positions)
    elif out is None:
        raise ValueError("the compiled interval core's forward needs out, or the rounds' combination")
    _kernel("interval_forward", dtype)(ctypes.byref(call))


def backward(q, k, v, g, spans, chunk: int, width: int, pad: int, lse, row, d_q, d_k, d_v, k_scale=None,
             g_scale=None) -> None:
    """d_q (n, d) by item, d_k and d_v in the padded layout of the span attention, given d_out (g: (n, dv),
    or Rows whose rows are times g_scale), the forward's lse and row = sum(d_out * out) - d_lse, by item
    (intervals.interval_backward); the other rows as for ``forward``. Every row of the gradients is
    written."""
    n, dtype = lse.shape[0], lse.dtype
    _check_geometry(n, chunk, width, pad)
    _check_spans(spans, width, n)
    padded = n + width - chunk
    (q_at, q_index, d), (v_at, v_index, dv) = _rows("q", q, dtype, n, n), _rows("v", v, dtype, n, padded)
    g_at, g_index, _ = _rows("d_out", g, dtype, n, n)
    if not isinstance(q, Rows) and k is None:
        raise ValueError("the compiled interval core needs the keys k of queries given as they lie")
    call = BackwardCall(n=n, d=d, dv=dv, chunk=chunk, width=width, pad=pad, q=q_at, q_index=q_index,
                        k=_check("k", k, dtype, padded * d), k_scale=_check("k_scale", k_scale, dtype, n),
                        v=v_at, v_index=v_index, g=g_at, g_index=g_index, g_scale=_check("g_scale", g_scale, dtype, n),
                        lo=_check("lo", spans.lo, torch.int64, n), hi=_check("hi", spans.hi, torch.int64, n),
                        skip=_check("skip", spans.skip, torch.int64, n), lse=_check("lse", lse, dtype, n),
                        row=_check("row", row, dtype, n), dq=_check("d_q", d_q, dtype, n * d),
                        dkp=_check("d_k", d_k, dtype, padded * d), dvp=_check("d_v", d_v, dtype, padded * dv),
                        threads=torch.get_num_threads())
    _kernel("interval_backward", dtype)(ctypes.byref(call))


def scatter_gradients(q: Rows, k_scale, order, pad: int, d_q, d_k, d_v, to_qk: Rows, to_v: Rows, to_scale) -> None:
    """A round's gradients (``backward``'s, keys q times k_scale) added in position order: to_qk's rows
    += d_q + k_scale d_k, to_scale[order] += d_k . q, to_v's rows += d_v."""
    n, d = d_q.shape
    dtype, dv = d_q.dtype, d_v.shape[1]
    q_at, q_index, _ = _rows("q", q, dtype, n)
    qk_at, qk_index, _ = _rows("d_qk", to_qk, dtype, n)
    v_at, v_index, _ = _rows("d_v", to_v, dtype, n)
    _check("order", order, torch.int64, n)
    _check_range("order", order[:n], 0, n)
    call = ScatterCall(n=n, d=d, dv=dv, pad=pad, q=q_at, q_index=q_index, k_scale=_check("k_scale", k_scale, dtype, n),
                       order=_check("order", order, torch.int64, n), dq=_check("d_q", d_q, dtype, n * d),
                       dkp=_check("d_k", d_k, dtype, (n + pad) * d), dvp=_check("d_v", d_v, dtype, (n + pad) * dv),
                       d_qk=qk_at, dq_index=qk_index, d_v=v_at, dv_index=v_index,
                       d_scale=_check("d_scale", to_scale, dtype, n), threads=torch.get_num_threads())
    _kernel("scatter_gradients", dtype)(ctypes.byref(call))


def hash_buckets(rotated: torch.Tensor, factors: tuple[int, ...], out: torch.Tensor) -> None:
    """Bucket ids of angular LSH (hashing.hash_vectors) in one pass: rotated (B, H, R, L, k), any strides,
    its columns the factors' halves one after the other; out (B, H, R, L) int64, any strides."""
    if out.dtype != torch.int64 or out.shape != rotated.shape[:4] or out.device.type != "cpu":
        raise ValueError(f"hash_buckets writes int64 CPU ids of shape {tuple(rotated.shape[:4])}, got out of "
                         f"dtype {out.dtype} and shape {tuple(out.shape)} on {out.device.type}")
    if not 1 <= len(factors) <= 2 or sum(f // 2 for f in factors) != rotated.shape[-1]:
        raise ValueError(f"hash_buckets takes one or two factors whose halves sum to {rotated.shape[-1]} "
                         f"columns, got {factors}")
    rotated = rotated if rotated.stride(-1) == 1 else rotated.contiguous()
    # Rows in the order they lie in memory (the kernel steps through the last dimension fastest).
    dims = sorted(range(4), key=lambda dim: -rotated.stride(dim))
    call = HashCall(x=_check_address(rotated), sizes=(_i64 * 4)(*(rotated.shape[dim] for dim in dims)),
                    strides=(_i64 * 4)(*(rotated.stride(dim) for dim in dims)),
                    out_strides=(_i64 * 4)(*(out.stride(dim) for dim in dims)), out=out.data_ptr(),
                    n_factors=len(factors), factors=(_i64 * 2)(*factors, *[0] * (2 - len(factors))),
                    threads=torch.get_num_threads())
    _kernel("hash_buckets", rotated.dtype)(ctypes.byref(call))


def _check_address(rotated: torch.Tensor) -> int:
    if rotated.device.type != "cpu" or rotated.dtype not in DTYPES:
        raise ValueError(f"hash_buckets takes float32 or float64 CPU values, got {rotated.dtype} on "
                         f"{rotated.device.type}")
    return rotated.data_ptr()


def round_spans(buckets: torch.Tensor, valid: torch.Tensor | None, chunk: int, before: int, after: int,
                causal: bool):
    """One LSH round's sort by bucket and its bucket-window spans in one pass (counting sort per sequence):
    buckets (B, H, L) int64, any strides; valid (B, L) bool or None. Returns positions (B, H, L) (the
    sorted items' positions), order (B H L,) (their indices in position order) and the spans' lo, hi,
    skip and has_other (B H L,), as sorting.sort_by_bucket, intervals.bucket_spans and make_spans give them."""
    if buckets.dtype != torch.int64 or buckets.dim() != 3 or buckets.device.type != "cpu":
        raise ValueError(f"round_spans takes (batch, heads, length) int64 CPU buckets, got {buckets.dtype} of "
                         f"shape {tuple(buckets.shape)} on {buckets.device.type}")
    batch, heads, length = buckets.shape
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (batch, length)):
        raise ValueError(f"round_spans takes validity as a ({batch}, {length}) bool tensor, got {valid.dtype} of "
                         f"shape {tuple(valid.shape)}")
    if chunk < 1 or before < 0 or after < 0 or length % chunk:
        raise ValueError(f"round_spans needs chunk >= 1 dividing the length {length} and before, after >= 0, got "
                         f"{chunk}, {before}, {after}")
    # The counting sort sizes its counts by the ids' range: ids in [0, 2^31) keep that sane.
    _check_range("bucket ids", buckets, 0, 2**31)
    n = batch * heads * length
    positions = torch.empty(batch, heads, length, dtype=torch.int64)
    order, lo, hi, skip = (torch.empty(n, dtype=torch.int64) for _ in range(4))
    has_other = torch.empty(n, dtype=torch.bool)
    valid = None if valid is None else valid.contiguous()
    call = RoundSpansCall(batch=batch, heads=heads, length=length, buckets=buckets.data_ptr(),
                          strides=(_i64 * 3)(*buckets.stride()), valid=None if valid is None else valid.data_ptr(),
                          chunk=chunk, before=before, after=after, causal=int(causal), positions=positions.data_ptr(),
                          order=order.data_ptr(), lo=lo.data_ptr(), hi=hi.data_ptr(), skip=skip.data_ptr(),
                          has_other=has_other.data_ptr(), threads=torch.get_num_threads())
    error = _lib().round_spans(ctypes.byref(call))
    if error == 1:
        raise ValueError("bucket_spans: padding shares a bucket with real items; give it buckets of its own")
    if error == 2:
        raise ValueError("make_spans: an interval reaches beyond the query's window of chunks")
    if error == 3:
        raise MemoryError("round_spans: no memory for the counts of the bucket ids")
    return positions, order, lo, hi, skip, has_other
