"""Defining the package's torch operators (namespace "reformer").

``operator`` turns a typed Python function into the operator reformer::NAME, its schema inferred from the
annotations (no argument mutated), the function its kernel for every device; torch.library.register_fake
and register_autograd then take the operator as for any other. torch.library.custom_op does the same, but
its kernels run under torch.compiler's "disable", whose first call imports the compiler: some 75 MiB of
resident memory in a process that never compiles.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    from torch.library import infer_schema
except ImportError:   # torch < 2.5
    from torch._library.infer_schema import infer_schema

LIBRARY = torch.library.Library("reformer", "FRAGMENT")


def operator(function: Callable) -> torch._ops.OpOverload:
    """Define ``function`` as the operator reformer::<its name> and return the operator."""
    name = function.__name__
    LIBRARY.define(name + infer_schema(function, mutates_args=()))
    LIBRARY.impl(name, function, "CompositeExplicitAutograd")
    return getattr(torch.ops.reformer, name).default
