"""The compiled interval core (interval_kernels.c), built on first use with the machine's C compiler.

Nothing is compiled at install time, so the project installs anywhere; the first call builds one shared
library (under a second on this machine) into ``$REFORMER_CACHE/kernels`` (default
``~/.cache/reformer/kernels``), named by a hash of the source, the flags, the compiler and the CPU, and
loads it through ctypes. Where no compiler works, or with ``REFORMER_NATIVE=0``, ``library()`` is None
and intervals.py runs its eager core, which computes the same thing (the tests hold both to the same
reference).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("interval_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]
# How the kernels run in parallel, in order of preference. "openmp": on torch's own OpenMP threads. Built
# with -fopenmp, the library needs libgomp.so.1, and the loader binds that to the libgomp torch has already
# loaded, so the kernels reuse torch's warm thread pool. POSIX threads of their own instead cost a thread
# start per parallel loop (~1,800 per layer step at 64K tokens) and compete for the cores with torch's
# threads, which spin a while after each of torch's ops: the layer step at 64K took 8-12% longer. Only
# where torch runs on libgomp ("pthreads" otherwise: -fopenmp-simd keeps the simd pragmas, no runtime).
THREADING = {"openmp": ["-fopenmp"], "pthreads": ["-fopenmp-simd"]}
DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc",
                 "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _build(compiler: str, flags: list[str]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu().encode()]))
    target = cache_dir() / "kernels" / f"interval-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(built, target)   # atomic: concurrent builders each put a whole file in place
    return target


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (their files; Linux only, empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if re.search(r"/lib(gomp|omp|iomp5)[^/]*\.so", line)}


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.round_spans.argtypes = [i64] * 3 + [ptr] + [i64] * 3 + [ptr] + [i64] * 3 + [i32] + [ptr] * 6 + [i32]
    lib.round_spans.restype = i32
    for name in DTYPES.values():
        for kernel, args in (("interval_forward", [i64] * 6 + [ptr] * 21 + [i32]),
                             ("interval_backward", [i64] * 6 + [ptr] * 17 + [i32]),
                             ("scatter_gradients", [i64] * 4 + [ptr] * 12 + [i32]),
                             ("hash_buckets", [ptr] * 5 + [i64, ptr, i32])):
            function = getattr(lib, f"{kernel}_{name}")
            function.argtypes = args
            function.restype = None


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled by REFORMER_NATIVE=0, or no working C compiler). Its
    ``threading`` attribute says which of THREADING it runs on."""
    if os.environ.get("REFORMER_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: the interval core runs eagerly (slower, same results)")
        return None
    runtimes, errors = _openmp_runtimes(), []
    for threading, flags in THREADING.items():
        if threading == "openmp" and not any("libgomp" in path for path in runtimes):
            continue   # torch runs on another runtime (or none): a second pool of threads would compete
        try:
            lib = ctypes.CDLL(str(_build(compiler, FLAGS + flags)))
            _declare(lib)
        except (OSError, subprocess.SubprocessError, AttributeError) as error:
            errors.append((getattr(error, "stderr", "") or str(error)).strip().splitlines()[:3])
            continue
        if threading == "openmp" and _openmp_runtimes() != runtimes:
            continue   # the build brought a runtime of its own (another compiler's): the same competition
        lib.threading = threading
        return lib
    log.warning("building the compiled interval core with %s failed, running it eagerly: %s", compiler,
                " / ".join(errors[-1]) if errors else "no usable build")
    return None


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the compiled core can take these tensors: float32 or float64 on the CPU, all one dtype."""
    dtype = tensors[0].dtype
    return (dtype in DTYPES and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and library() is not None)


@dataclass
class Rows:
    """Rows the kernels read by item: item i's row (``size`` wide) of ``base`` starts ``index[i]``
    elements past base's first element. The kernels gather them a block at a time into buffers that stay
    in cache, instead of sorted copies in memory."""

    base: torch.Tensor    # contiguous
    index: torch.Tensor   # (n,) int64
    size: int


def _address(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("the compiled interval core needs contiguous tensors")
    return t.data_ptr()


def _call(kernel: str, like: torch.Tensor, sizes, tensors) -> None:
    getattr(library(), f"{kernel}_{DTYPES[like.dtype]}")(*sizes, *(_address(t) for t in tensors),
                                                        torch.get_num_threads())


def _rows(x: torch.Tensor | Rows) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    return (x.base, x.index, x.size) if isinstance(x, Rows) else (x, None, x.shape[-1])


def forward(q, k, v, spans, chunk: int, width: int, pad: int, lse, out=None, k_scale=None, combine=None,
            finish=None) -> None:
    """Span attention of n items in sorted order (intervals.interval_forward), lse (n,) by item.

    Rows as they lie: q (n, d), k and v padded (``pad`` rows in front, n + width - chunk in all). Or by
    index: q and v Rows, k None (shared-QK: the keys are the q rows times k_scale (n,)). Outputs: out
    (n, dv) by item; or, with ``combine`` = (order, has_other, acc, best, norm, scores), the round added
    to the online softmax over rounds in position order (rounds.heads_forward); with ``finish`` =
    (out Rows by position, total, any_other) too (the last round), the softmax finished: the result
    into out's rows, the total normaliser and any_other (no round saw another key: out is v) by position."""
    (q, q_index, d), (v, v_index, dv) = _rows(q), _rows(v)
    order, has_other, acc, best, norm, scores = combine or (None,) * 6
    final_out, total, any_other = finish or (None,) * 3
    final = (final_out.base, final_out.index) if finish else (None, None)
    _call("interval_forward", lse, (lse.shape[0], d, dv, chunk, width, pad),
          (q, q_index, k, k_scale, v, v_index, spans.lo, spans.hi, spans.skip, out, lse, order, has_other, acc,
           best, norm, scores, *final, total, any_other))


def backward(q, k, v, g, spans, chunk: int, width: int, pad: int, lse, row, d_q, d_k, d_v, k_scale=None,
             g_scale=None) -> None:
    """d_q (n, d) by item, d_k and d_v in the padded layout of the span attention, given d_out (g: (n, dv),
    or Rows whose rows are times g_scale), the forward's lse and row = sum(d_out * out) - d_lse, by item
    (intervals.interval_backward); the other rows as for ``forward``. Every row of the gradients is
    written."""
    (q, q_index, d), (v, v_index, dv), (g, g_index, _) = _rows(q), _rows(v), _rows(g)
    _call("interval_backward", lse, (lse.shape[0], d, dv, chunk, width, pad),
          (q, q_index, k, k_scale, v, v_index, g, g_index, g_scale, spans.lo, spans.hi, spans.skip, lse, row,
           d_q, d_k, d_v))


def scatter_gradients(q: Rows, k_scale, order, pad: int, d_q, d_k, d_v, to_qk: Rows, to_v: Rows, to_scale) -> None:
    """A round's gradients (``backward``'s, keys q times k_scale) added in position order: to_qk's rows
    += d_q + k_scale d_k, to_scale[order] += d_k . q, to_v's rows += d_v."""
    n, d = d_q.shape
    _call("scatter_gradients", d_q, (n, d, d_v.shape[1], pad),
          (q.base, q.index, k_scale, order, d_q, d_k, d_v, to_qk.base, to_qk.index, to_v.base, to_v.index,
           to_scale))


def _longs(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def hash_buckets(rotated: torch.Tensor, factors: tuple[int, ...], out: torch.Tensor) -> None:
    """Bucket ids of angular LSH (hashing.hash_vectors) in one pass: rotated (B, H, R, L, k), any strides,
    its columns the factors' halves one after the other; out (B, H, R, L) int64, any strides."""
    if out.dtype != torch.int64:
        raise ValueError(f"hash_buckets writes int64 ids, got out of dtype {out.dtype}")
    rotated = rotated if rotated.stride(-1) == 1 else rotated.contiguous()
    # Rows in the order they lie in memory (the kernel steps through the last dimension fastest). Bound to
    # names: a temporary's memory would be freed before the call reads it.
    dims = sorted(range(4), key=lambda dim: -rotated.stride(dim))
    sizes, strides, out_strides = (_longs(values[dim] for dim in dims)
                                   for values in (rotated.shape, rotated.stride(), out.stride()))
    factor_sizes = _longs(factors)
    getattr(library(), f"hash_buckets_{DTYPES[rotated.dtype]}")(
        rotated.data_ptr(), sizes.data_ptr(), strides.data_ptr(), out.data_ptr(), out_strides.data_ptr(),
        len(factors), factor_sizes.data_ptr(), torch.get_num_threads())


def round_spans(buckets: torch.Tensor, valid: torch.Tensor | None, chunk: int, before: int, after: int,
                causal: bool):
    """One LSH round's sort by bucket and its bucket-window spans in one pass (counting sort per sequence):
    buckets (B, H, L) int64, any strides; valid (B, L) bool or None. Returns positions (B, H, L) (the
    sorted items' positions), order (B H L,) (their indices in position order) and the spans' lo, hi,
    skip and has_other (B H L,), as rounds.sort_by_bucket, intervals.bucket_spans and make_spans give them."""
    if buckets.dtype != torch.int64 or (valid is not None and valid.dtype != torch.bool):
        raise ValueError(f"round_spans takes int64 buckets and bool validity, got {buckets.dtype} and "
                         f"{None if valid is None else valid.dtype}")
    batch, heads, length = buckets.shape
    n = batch * heads * length
    positions = torch.empty(batch, heads, length, dtype=torch.int64)
    order, lo, hi, skip = (torch.empty(n, dtype=torch.int64) for _ in range(4))
    has_other = torch.empty(n, dtype=torch.bool)
    valid = None if valid is None else valid.contiguous()
    error = library().round_spans(batch, heads, length, buckets.data_ptr(), *buckets.stride(), _address(valid),
                                  chunk, before, after, int(causal), *(_address(t) for t in (positions, order, lo, hi,
                                                                                            skip, has_other)),
                                  torch.get_num_threads())
    if error == 1:
        raise ValueError("bucket_spans: padding shares a bucket with real items; give it buckets of its own")
    if error == 2:
        raise ValueError("make_spans: an interval reaches beyond the query's window of chunks")
    if error == 3:
        raise MemoryError("round_spans: no memory for the counts of the bucket ids")
    return positions, order, lo, hi, skip, has_other
