"""Position-wise layers: chunked feed-forward and position embeddings (axial and learned)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ReformerConfig

ACTIVATION_FUNCTIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> dropout -> activation -> Linear -> dropout, as in transformers' Reformer.

    Applied to ``chunk_size`` positions at a time (0 = all at once): the (length, d_ff) hidden
    activations then never exist whole, which is what lets long sequences fit. The result is the same.
    (batch, length, d_model) -> (batch, length, d_model).
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.d_model, config.d_ff)
        self.output = nn.Linear(config.d_ff, config.d_model)
        self.dropout = config.dropout
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self.chunk_size = config.ff_chunk_size

    def _forward_chunk(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.dense(self.norm(x)), self.dropout, self.training)
        return F.dropout(self.output(self.activation(h)), self.dropout, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.chunk_size or x.shape[1] <= self.chunk_size:
            return self._forward_chunk(x)
        return torch.cat([self._forward_chunk(part) for part in x.split(self.chunk_size, dim=1)], dim=1)


class AxialPositionEmbedding(nn.Module):
    """Position embeddings factorised over axes: position p = (i_1, ..., i_n) in mixed radix.

    With shape (n_1, n_2) and widths (d_1, d_2), position p gets cat(E_1[p // n_2], E_2[p % n_2]):
    n_1 * d_1 + n_2 * d_2 parameters instead of n_1 * n_2 * d. Any position below the product of the
    shape works, so a model trained at one length runs (and fine-tunes) at any shorter one.
    ``weights[i]`` has shape (n_i, d_i).
    """

    def __init__(self, shape: tuple[int, ...], dims: tuple[int, ...], init_std: float = 1.0):
        super().__init__()
        self.shape = tuple(shape)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(n, d) * init_std)
                                        for n, d in zip(shape, dims, strict=True))
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        self.register_buffer("strides", torch.tensor(strides), persistent=False)
        self.register_buffer("sizes", torch.tensor(shape), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (...,) int64 -> (..., sum(dims))."""
        index = (positions[..., None] // self.strides) % self.sizes
        # F.embedding, not w[index]: the backward of advanced indexing accumulates repeated rows in an order
        # that varies with the threads' timing on the CPU; embedding's backward sums each row in one order.
        return torch.cat([F.embedding(index[..., i], w) for i, w in enumerate(self.weights)], dim=-1)


class LearnedPositionEmbedding(nn.Module):
    """An embedding row per position: positions (...,) -> (..., d_model)."""

    def __init__(self, max_seq_len: int, d_model: int, init_std: float):
        super().__init__()
        self.embedding = nn.Embedding(max_seq_len, d_model)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(positions)


def position_embedding(config: ReformerConfig) -> nn.Module | None:
    """The position embedding the config asks for, or None."""
    if config.position_embedding == "axial":
        return AxialPositionEmbedding(config.axial_shape, config.axial_dims, config.axial_init_std)
    if config.position_embedding == "learned":
        return LearnedPositionEmbedding(config.max_seq_len, config.d_model, config.init_std)
    return None
