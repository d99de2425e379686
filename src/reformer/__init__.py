"""reformer: transformers for very long sequences with LSH attention and reversible layers."""

from .attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
from .config import ReformerConfig
from .model import ReformerLM

__all__ = ["ReformerConfig", "ReformerLM", "LSHSelfAttention", "LocalSelfAttention", "FullSelfAttention"]
__version__ = "0.1.0"
