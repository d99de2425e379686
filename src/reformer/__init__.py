"""reformer: transformers for very long sequences with LSH attention and reversible layers."""

from . import memory

# First, before any of torch's large blocks: put them on huge pages (see memory.py).
memory.offer_huge_pages_to_torch()

from .attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention  # noqa: E402
from .config import ReformerConfig  # noqa: E402
from .model import ReformerLM  # noqa: E402

__all__ = ["ReformerConfig", "ReformerLM", "LSHSelfAttention", "LocalSelfAttention", "FullSelfAttention"]
__version__ = "0.1.0"
