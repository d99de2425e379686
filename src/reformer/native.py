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
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

from .data import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("interval_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]
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


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu().encode()]))
    target = cache_dir() / "kernels" / f"interval-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(built, target)   # atomic: concurrent builders each put a whole file in place
    return target


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for name in DTYPES.values():
        forward = getattr(lib, f"interval_forward_{name}")
        forward.argtypes = [i64] * 5 + [ptr] * 8 + [i32]
        forward.restype = None
        backward = getattr(lib, f"interval_backward_{name}")
        backward.argtypes = [i64] * 6 + [ptr] * 12 + [i32]
        backward.restype = None


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled by REFORMER_NATIVE=0, or no working C compiler)."""
    if os.environ.get("REFORMER_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: the interval core runs eagerly (slower, same results)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        _declare(lib)
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        detail = (getattr(error, "stderr", "") or str(error)).strip().splitlines()[:3]
        log.warning("building the compiled interval core with %s failed, running it eagerly: %s", compiler,
                    " / ".join(detail))
        return None
    return lib


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the compiled core can take these tensors: float32 or float64 on the CPU, all one dtype."""
    dtype = tensors[0].dtype
    return (dtype in DTYPES and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and library() is not None)


def _address(t: torch.Tensor) -> int:
    if not t.is_contiguous():
        raise ValueError("the compiled interval core needs contiguous tensors")
    return t.data_ptr()


def forward(q, k_padded, v_padded, lo, hi, skip, chunk: int, width: int, out, lse) -> None:
    """out (n, d_v) and lse (n,) of queries q (n, d) over their spans (intervals.interval_forward)."""
    n, d = q.shape
    getattr(library(), f"interval_forward_{DTYPES[q.dtype]}")(
        n, d, v_padded.shape[-1], chunk, width,
        *(_address(t) for t in (q, k_padded, v_padded, lo, hi, skip, out, lse)), torch.get_num_threads())


def backward(q, k_padded, v_padded, lo, hi, skip, chunk: int, width: int, d_out, lse, row,
             d_q, d_k, d_v) -> None:
    """d_q (n, d), d_k and d_v (padded rows, d) of the span attention given d_out, the forward's lse
    and row = sum(d_out * out) - d_lse (intervals.interval_backward); every row of the gradients is
    written."""
    n, d = q.shape
    getattr(library(), f"interval_backward_{DTYPES[q.dtype]}")(
        n, d, v_padded.shape[-1], chunk, width, k_padded.shape[0],
        *(_address(t) for t in (q, k_padded, v_padded, lo, hi, skip, d_out, lse, row, d_q, d_k, d_v)),
        torch.get_num_threads())
