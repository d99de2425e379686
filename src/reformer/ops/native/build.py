"""Building and loading the compiled core (kernels.c, and decode.c for cached decoding) with the machine's C
compiler.

Nothing is compiled at install time, so the project installs anywhere; the first use builds one shared
library into ``$REFORMER_CACHE/kernels`` (default ``~/.cache/reformer/kernels``), named by a hash of the
source, the flags, the compiler and the CPU, and loads it through ctypes. Where no compiler works,
``library()`` is None (with one warning) and the "native" backend is not available (ops/backend.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from ...files import cache_dir, cpuinfo

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.c", "decode.c"))
# -fno-trapping-math lets the loops around exp's conversions vectorise. The sources build without a
# warning under -Wall -Wextra (tests/test_native.py holds it to that).
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra"]
# How the kernels run in parallel, in order of preference. "openmp": on torch's own OpenMP threads. Built
# with -fopenmp, the library needs libgomp.so.1, and the loader binds that to the libgomp torch has already
# loaded, so the kernels reuse torch's warm thread pool instead of starting threads of their own per call,
# which would compete for the cores with torch's threads (they spin a while after each of torch's ops).
# Only where torch runs on libgomp ("pthreads" otherwise: -fopenmp-simd keeps the simd pragmas, no runtime).
THREADING = {"openmp": ["-fopenmp"], "pthreads": ["-fopenmp-simd"]}


def compiler() -> str | None:
    """The C compiler to build with: $CC, Python's own, cc, gcc or clang, the first that exists."""
    for name in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc",
                 "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform's name."""
    return cpuinfo("flags") or platform.processor() + platform.machine()


def _build(compiler_path: str, flags: list[str]) -> Path:
    version = subprocess.run([compiler_path, "--version"], capture_output=True, text=True, timeout=60).stdout
    sources = [source.read_bytes() for source in SOURCES]
    digest = hashlib.sha256(b"\0".join([*sources, " ".join(flags).encode(), version.encode(), _cpu().encode()]))
    target = cache_dir() / "kernels" / f"interval-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler_path, *flags, *map(str, SOURCES), "-o", str(built), "-lm"], check=True,
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


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where no C compiler builds them. Its ``threading`` attribute says
    which of THREADING it runs on."""
    compiler_path = compiler()
    if compiler_path is None:
        log.warning("no C compiler found: the compiled interval core (attention_backend 'native') is not "
                    "available")
        return None
    runtimes, errors = _openmp_runtimes(), []
    for threading, flags in THREADING.items():
        if threading == "openmp" and not any("libgomp" in path for path in runtimes):
            continue   # torch runs on another runtime (or none): a second pool of threads would compete
        try:
            lib = ctypes.CDLL(str(_build(compiler_path, FLAGS + flags)))
        except (OSError, subprocess.SubprocessError) as error:
            errors.append((getattr(error, "stderr", "") or str(error)).strip().splitlines()[:3])
            continue
        if threading == "openmp" and _openmp_runtimes() != runtimes:
            continue   # the build brought a runtime of its own (another compiler's): the same competition
        lib.threading = threading
        return lib
    log.warning("building the compiled interval core with %s failed, so attention_backend 'native' is not "
                "available: %s", compiler_path, " / ".join(errors[-1]) if errors else "no usable build")
    return None
