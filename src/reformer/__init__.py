"""reformer: transformers for very long sequences with LSH attention and reversible layers.

Importing the package changes nothing in the process: no environment variables, no global torch settings,
no random state (tests/test_layout.py holds it to that).
"""

from .config import ReformerConfig
from .nn.attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
from .nn.model import ReformerLM
from .version import __version__

__all__ = ["ReformerConfig", "ReformerLM", "LSHSelfAttention", "LocalSelfAttention", "FullSelfAttention",
           "__version__"]
