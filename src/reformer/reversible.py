"""Reversible residual blocks and the stack that trains them without storing activations.

A block maps (x1, x2) to (y1, y2) = (x1 + F(x2), x2 + G(y1)) with F = attention and G = feed-forward,
each behind its LayerNorm. The inputs follow from the outputs: x2 = y2 - G(y1), x1 = y1 - F(x2). So
the reversible stack keeps only the last block's output; backward walks the blocks in reverse,
rebuilding each block's inputs and recomputing F and G with gradients on.

The recomputation must repeat the forward pass exactly: dropout masks (global torch RNG) and hashing
rotations (each LSH layer's call counter) are captured before each branch and replayed.

Parameters are passed to the autograd function as inputs and their gradients returned from its
backward, so they reach ``.grad`` through the ordinary autograd engine: DistributedDataParallel's
gradient hooks fire as for any other module, which is what the anchors' reversible layers break.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTENTION_LAYERS, LSHSelfAttention
from .config import ReformerConfig
from .layers import FeedForward


class AttentionBranch(nn.Module):
    """F: LayerNorm -> self-attention -> dropout. (batch, length, d_model) -> same."""

    def __init__(self, config: ReformerConfig, layer_idx: int):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = ATTENTION_LAYERS[config.attn_layers[layer_idx]](config, layer_idx)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> torch.Tensor:
        return F.dropout(self.attention(self.norm(x), key_valid, n_hashes), self.dropout, self.training)


class ReversibleBlock(nn.Module):
    """(x1, x2) -> (x1 + F(x2), x2 + G(x1 + F(x2))), F attention and G feed-forward."""

    def __init__(self, config: ReformerConfig, layer_idx: int):
        super().__init__()
        self.attention = AttentionBranch(config, layer_idx)
        self.feed_forward = FeedForward(config)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y1 = x1 + self.attention(x2, key_valid, n_hashes)
        return y1, x2 + self.feed_forward(y1)


@dataclass
class RandomState:
    """What a branch's forward draws from: the global RNG state(s) and the LSH layers' call counters."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device
    hash_calls: dict[LSHSelfAttention, int]

    @classmethod
    def capture(cls, module: nn.Module, device: torch.device) -> "RandomState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        counters = {m: m.hash_calls for m in module.modules() if isinstance(m, LSHSelfAttention)}
        return cls(torch.get_rng_state(), cuda, device, counters)

    @contextlib.contextmanager
    def replay(self):
        """Run the block inside with the captured randomness; afterwards everything is as before."""
        devices = [self.device] if self.cuda is not None else []
        current = {m: m.hash_calls for m in self.hash_calls}
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            for module, calls in self.hash_calls.items():
                module.hash_calls = calls
            try:
                yield
            finally:
                for module, calls in current.items():
                    module.hash_calls = calls


class _ReversibleFunction(torch.autograd.Function):
    """Runs the blocks forward without a graph; rebuilds inputs and gradients block by block backward."""

    @staticmethod
    def forward(ctx, x1, x2, key_valid, n_hashes, blocks, autocast, *params):
        states = []
        with torch.no_grad():
            for block in blocks:
                state_f = RandomState.capture(block.attention, x1.device)
                y1 = x1 + block.attention(x2, key_valid, n_hashes)
                state_g = RandomState.capture(block.feed_forward, x1.device)
                x1, x2 = y1, x2 + block.feed_forward(y1)
                states.append((state_f, state_g))
        ctx.blocks, ctx.states, ctx.n_hashes, ctx.autocast = blocks, states, n_hashes, autocast
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        ctx.n_params = len(params)
        ctx.save_for_backward(x1, x2, key_valid)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2, key_valid = ctx.saved_tensors
        param_grads: list[torch.Tensor | None] = [None] * ctx.n_params
        device_type, dtype, enabled = ctx.autocast

        def recompute(branch, state, inputs, grad_out, *args, chunk_size=0):
            """Re-run ``branch`` on ``inputs``; return its output and the gradients it passes back.

            A position-wise branch (``chunk_size`` > 0) is re-run and differentiated ``chunk_size``
            positions at a time, in forward's order (so dropout draws the same masks): its hidden
            activations then never exist whole in backward either."""
            params = [p for p in branch.parameters() if p.requires_grad]
            if not chunk_size or inputs.shape[1] <= chunk_size:
                pieces = [(inputs, grad_out)]
            else:
                pieces = list(zip(inputs.split(chunk_size, dim=1), grad_out.split(chunk_size, dim=1)))
            outs, input_grads = [], []
            with state.replay():
                for piece, piece_grad in pieces:
                    with torch.enable_grad(), torch.autocast(device_type, dtype, enabled=enabled):
                        piece = piece.detach().requires_grad_(True)
                        out = branch(piece, *args)
                    grads = torch.autograd.grad(out, [piece, *params], piece_grad, allow_unused=True)
                    for p, g in zip(params, grads[1:]):
                        i = ctx.param_index[id(p)]
                        param_grads[i] = g if param_grads[i] is None or g is None else param_grads[i] + g
                    outs.append(out.detach())
                    input_grads.append(grads[0])
            if len(pieces) == 1:
                return outs[0], input_grads[0]
            return torch.cat(outs, dim=1), torch.cat(input_grads, dim=1)

        # Names are dropped as soon as they are used up, so that while a branch is re-run only y1 or x2
        # and the two gradients are held besides it.
        for block, (state_f, state_g) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            g_out, d_from_g = recompute(block.feed_forward, state_g, y1, dy2,
                                        chunk_size=block.feed_forward.chunk_size)
            with torch.no_grad():
                x2 = y2 - g_out
                dy1 = dy1 + d_from_g            # total gradient reaching y1, i.e. dx1
            del g_out, d_from_g, y2
            f_out, d_from_f = recompute(block.attention, state_f, x2, dy1, key_valid, ctx.n_hashes)
            with torch.no_grad():
                x1 = y1 - f_out
                dy2 = dy2 + d_from_f            # dx2
            del f_out, d_from_f, y1
            y1, y2 = x1, x2
        return (dy1, dy2, None, None, None, None, *param_grads)


class ReversibleStack(nn.Module):
    """The blocks of a model, run reversibly (activations kept once) or with plain autograd.

    forward(x1, x2 (batch, length, d_model), key_valid (batch, length) bool or None, n_hashes=None)
    -> (y1, y2). Both modes compute the same function with the same randomness.
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ReversibleBlock(config, i) for i in range(config.n_layers))
        self.reversible = config.reversible

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.reversible and torch.is_grad_enabled() and (params or x1.requires_grad or x2.requires_grad):
            device_type = x1.device.type
            autocast = (device_type, torch.get_autocast_dtype(device_type),
                        torch.is_autocast_enabled(device_type))
            return _ReversibleFunction.apply(x1, x2, key_valid, n_hashes, self.blocks, autocast, *params)
        for block in self.blocks:
            x1, x2 = block(x1, x2, key_valid, n_hashes)
        return x1, x2
