"""Large CPU buffers on transparent huge pages.

The compiled interval core reads the rows of every round in bucket order: scattered rows of 16-64 MiB
tensors. On 4 KiB pages nearly every such row costs a TLB miss and a page walk (expensive under
virtualisation); on 2 MiB pages a few cover a whole tensor. Linux backs a private anonymous mapping with
huge pages where it is asked to (MADV_HUGEPAGE, the "madvise" setting of transparent_hugepage), so the
buffers the core reads at random come from ``empty`` here. Elsewhere (other systems, other devices, small
sizes) it is plain ``new_empty``.

The rest of a step's large tensors come from torch's allocator, on fresh 4 KiB pages each time (glibc
maps blocks this large anew per allocation, and every first touch of a page faults). torch puts its
blocks of 2 MiB and more on huge pages when THP_MEM_ALLOC_ENABLE is set before its first such block:
``offer_huge_pages_to_torch`` sets it. Importing reformer does not (a library leaves the process's
environment alone); the ``reformer`` command calls it first thing, and so may any program, before its
first large tensor.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 << 20   # smaller buffers stay with torch's allocator


@functools.lru_cache(maxsize=1)
def _huge_pages_offered() -> bool:
    """Linux with transparent huge pages "always" or "madvise". Where they are "never", a mapping per
    buffer would only cost page faults that torch's allocator (glibc's heap) avoids for 4-32 MiB blocks."""
    if not (hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")):
        return False
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def offer_huge_pages_to_torch() -> bool:
    """Ask torch's CPU allocator to put blocks of 2 MiB and more on transparent huge pages: sets
    THP_MEM_ALLOC_ENABLE=1 in this process's environment (torch reads it at its first such block, so call
    this before any large tensor). Returns whether it was set here: not where it is set already (the
    user's choice stands), REFORMER_HUGE_PAGES=0, or the kernel offers no huge pages."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ or os.environ.get("REFORMER_HUGE_PAGES", "1") == "0":
        return False
    if not _huge_pages_offered():
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of like's dtype and device, on huge pages where offered.

    The memory is a mapping of its own, unmapped when the last tensor viewing it is freed."""
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes < MIN_BYTES or not _huge_pages_offered():
        return like.new_empty(shape)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:   # not offered by this kernel: ordinary pages
        pass
    flat = torch.frombuffer(mapping, dtype=like.dtype)   # keeps the mapping alive
    start = (-flat.data_ptr() % HUGE_PAGE) // like.element_size()   # whole huge pages from the first row
    return flat[start:start + numel].view(shape)


def carve(like: torch.Tensor, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Contiguous tensors of the given shapes (like's dtype and device), views of one fresh allocation
    from ``empty``.

    Blocks above glibc's mmap threshold (at most 32 MiB) come from the system and go back to it whole;
    smaller ones land in the heap, where the holes they leave between longer-lived tensors stay resident.
    Rows that a call allocates together are carved from one block, so they leave no such holes.
    """
    sizes = [math.prod(shape) for shape in shapes]
    flat = empty((sum(sizes),), like)
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T (no bias) into a buffer from ``empty``: (..., in) -> (..., out). Under autocast it is
    F.linear: autocast chooses the dtype (bfloat16), which a buffer given as ``out`` would override."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.nn.functional.linear(x, weight)
    out = empty((*x.shape[:-1], weight.shape[0]), x)
    torch.matmul(x, weight.t(), out=out)
    return out
