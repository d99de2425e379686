"""Reversible residual blocks and the stack that trains them without storing activations.

A block maps (x1, x2) to (y1, y2) = (x1 + F(x2), x2 + G(y1)) with F = attention and G = feed-forward,
each behind its LayerNorm. The inputs follow from the outputs: x2 = y2 - G(y1), x1 = y1 - F(x2). So
the reversible stack keeps only the last block's output; backward walks the blocks in reverse,
rebuilding each block's inputs and recomputing F and G with gradients on.

The recomputation must repeat the forward pass exactly: dropout masks (global torch RNG) and hashing
rotations (each LSH layer's call counter) are captured before each branch and replayed.

The stack runs as two torch operators, ``reformer::reversible_forward`` and ``reformer::reversible_backward``
(the second differentiates the first): torch.compile traces a model through them without a break
(the blocks run inside, eagerly, on their own operators), and the parameters are the operators' inputs,
so their gradients reach ``.grad`` through the ordinary autograd engine: DistributedDataParallel's
gradient hooks fire as for any other module, which is what the anchors' reversible layers break. The
operators find the blocks by the stack's number (a stack registers itself when built).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ReformerConfig
from ..ops.registry import operator
from .attention import ATTENTION_LAYERS, LSHSelfAttention
from .layers import FeedForward

_STACKS: "weakref.WeakValueDictionary[int, ReversibleStack]" = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()
# The dispatcher's thread-local key sets of ordinary eager code. An operator's implementation runs with
# autograd's keys excluded; the backward operator restores these to differentiate the recomputed blocks.
_EAGER_KEYS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def reversible_step(x1: torch.Tensor, x2: torch.Tensor, f: Callable, g: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """The reversible block's wiring: (x1, x2) -> (y1, y2) = (x1 + f(x2), x2 + g(y1))."""
    y1 = x1 + f(x2)
    return y1, x2 + g(y1)


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
                n_hashes: int | None = None, capture=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``capture``, if given, is called with each branch before it runs (the reversible stack records the
        branch's randomness there)."""
        def attention(x):
            if capture is not None:
                capture(self.attention)
            return self.attention(x, key_valid, n_hashes)

        def feed_forward(y):
            if capture is not None:
                capture(self.feed_forward)
            return self.feed_forward(y)

        return reversible_step(x1, x2, attention, feed_forward)


class RandomStates:
    """What the branches' forwards draw from, one row per branch in forward's order: the CPU RNG's state and
    the CUDA RNG's state on the stack's device (empty rows where the branches draw nothing: no dropout, or
    evaluation; the CUDA row elsewhere), and the LSH layers' call counters (-1 where a layer is not in the
    branch)."""

    def __init__(self, stack: "ReversibleStack", device: torch.device):
        self.lsh = [m for m in stack.modules() if isinstance(m, LSHSelfAttention)]
        self.device, self.draws = device, stack.draws_randomness()
        self.cpu, self.cuda, self.calls = [], [], []

    @staticmethod
    def sizes(stack: "ReversibleStack", device: torch.device) -> tuple[int, int]:
        """Bytes of a branch's CPU and CUDA states."""
        if not stack.draws_randomness():
            return 0, 0
        return torch.get_rng_state().numel(), torch.cuda.get_rng_state(device).numel() if device.type == "cuda" else 0

    def capture(self, branch: nn.Module) -> None:
        none = torch.empty(0, dtype=torch.uint8)
        self.cpu.append(torch.get_rng_state() if self.draws else none)
        self.cuda.append(torch.cuda.get_rng_state(self.device) if self.draws and self.device.type == "cuda" else none)
        inside = {id(m) for m in branch.modules()}
        self.calls.append(torch.stack([m.hash_calls if id(m) in inside else torch.tensor(-1) for m in self.lsh])
                          if self.lsh else torch.empty(0, dtype=torch.int64))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.stack(self.cpu), torch.stack(self.cuda), torch.stack(self.calls)

    @contextlib.contextmanager
    def replay(self, cpu: torch.Tensor, cuda: torch.Tensor, calls: torch.Tensor):
        """Run a branch inside with the randomness one row recorded; afterwards everything is as before."""
        devices = [self.device] if self.device.type == "cuda" else []
        current = [m.hash_calls.clone() for m in self.lsh]
        drew = cpu.numel() > 0   # forward recorded the states: the branch draws
        with torch.random.fork_rng(devices=devices, enabled=drew):
            if drew:
                torch.set_rng_state(cpu)
                if devices:
                    torch.cuda.set_rng_state(cuda, self.device)
            for module, count in zip(self.lsh, calls, strict=True):
                if count >= 0:
                    module.hash_calls.fill_(count)
            try:
                yield
            finally:
                for module, count in zip(self.lsh, current, strict=True):
                    module.hash_calls.copy_(count)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _SavedStorages:
    """Saved-tensor hooks that note which storages a graph saves for its backward."""

    def __init__(self):
        self.storages: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.storages.add(_storage(t))
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _release_unsaved(out: torch.Tensor, kept: set[int]) -> None:
    """Give back the memory of a re-run branch's output before its backward runs, where nothing holds it:
    its value is used up (subtracted from the block's output), and a branch whose backward does not read
    its own output (linear, dropout) has not saved it. ``kept``: the storages the backward reads (caught by
    saved-tensor hooks) and the branch's input. Storages that cannot shrink (huge-page buffers) stay."""
    if _storage(out) in kept:
        return
    try:
        out.untyped_storage().resize_(0)
    except RuntimeError:
        pass


def _stack(number: int) -> "ReversibleStack":
    stack = _STACKS.get(number)
    if stack is None:
        raise ValueError(f"reversible stack {number} no longer exists")
    return stack


def _autocast(device: torch.device, enabled: bool, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


@operator
def reversible_forward(x1: torch.Tensor, x2: torch.Tensor, key_valid: torch.Tensor | None, params: list[torch.Tensor],
                       stack: int, n_hashes: int | None, autocast: bool, autocast_dtype: torch.dtype,
                       reuse_outputs: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks of stack ``stack`` on (x1, x2) (batch, length, d_model), without a graph. Returns (y1, y2)
    and the branches' random states (RandomStates.tensors) for the backward. ``reuse_outputs``: see
    ReversibleStack.forward (the backward reads it)."""
    module = _stack(stack)
    states = RandomStates(module, x1.device)
    with torch.no_grad(), _autocast(x1.device, autocast, autocast_dtype):
        for block in module.blocks:
            x1, x2 = block(x1, x2, key_valid, n_hashes, capture=states.capture)
    return (x1, x2, *states.tensors())


@torch.library.register_fake(reversible_forward)
def _(x1, x2, key_valid, params, stack, n_hashes, autocast, autocast_dtype, reuse_outputs):
    module = _stack(stack)
    branches = 2 * len(module.blocks)
    lsh = sum(isinstance(m, LSHSelfAttention) for m in module.modules())
    cpu, cuda = RandomStates.sizes(module, x1.device)
    return (torch.empty_like(x1), torch.empty_like(x2), torch.empty(branches, cpu, dtype=torch.uint8),
            torch.empty(branches, cuda, dtype=torch.uint8), torch.empty(branches, lsh, dtype=torch.int64))


@operator
def reversible_backward(dy1: torch.Tensor, dy2: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor,
                        key_valid: torch.Tensor | None, cpu_states: torch.Tensor, cuda_states: torch.Tensor,
                        hash_calls: torch.Tensor, stack: int, n_hashes: int | None, autocast: bool,
                        autocast_dtype: torch.dtype, reuse_outputs: bool) -> list[torch.Tensor]:
    """Gradients of reversible_forward: [dx1, dx2, *the gradients of the stack's trained parameters],
    rebuilding each block's inputs from its outputs and re-running its branches with gradients on, last
    block first. (The parameters are the stack's own, not saved: they are alive as long as it is.)

    With ``reuse_outputs`` the kernel writes its results into dy1, dy2, y1 and y2, which the schema does
    not declare: the stack sets it only outside compiled graphs (eager dispatch does not read the
    schema's mutations), where a declared mutation would cost a compiled graph four copies."""
    module = _stack(stack)
    states = RandomStates(module, y1.device)
    params = module.trained_parameters()
    index = {id(p): i for i, p in enumerate(params)}
    param_grads: list[torch.Tensor | None] = [None] * len(index)

    def recompute(branch, row, inputs, target, d_inputs, grad_out, *args, chunk_size=0):
        """Re-run ``branch`` on ``inputs``; subtract its output from ``target`` and add the gradient it passes
        back to its input to ``d_inputs`` (both in place), the parameters' gradients to ``param_grads``.

        A position-wise branch (``chunk_size`` > 0) is re-run and differentiated ``chunk_size`` positions at
        a time, in forward's order (so dropout draws the same masks): its hidden activations then never
        exist whole in backward either, nor does its whole output."""
        trained = [p for p in branch.parameters() if p.requires_grad]
        length = inputs.shape[1]
        step = chunk_size if chunk_size and length > chunk_size else length
        # (set_rng_state reads a tensor of its own: a row of the stacked states is cloned)
        with states.replay(cpu_states[row].clone(), cuda_states[row].clone(), hash_calls[row]):
            for start in range(0, length, step):
                part = slice(start, start + step)
                saved = _SavedStorages()
                with torch.enable_grad(), _autocast(y1.device, autocast, autocast_dtype), \
                        torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                    piece = inputs[:, part].detach().requires_grad_(True)
                    out = branch(piece, *args)
                target[:, part].sub_(out.detach())
                _release_unsaved(out, saved.storages | {_storage(inputs)})
                grads = torch.autograd.grad(out, [piece, *trained], grad_out[:, part], allow_unused=True)
                for p, g in zip(trained, grads[1:], strict=True):
                    i = index[id(p)]
                    param_grads[i] = g if param_grads[i] is None or g is None else param_grads[i] + g
                d_inputs[:, part].add_(grads[0])
                del out, grads

    # Every block rebuilds its inputs and their gradients in place: x2 = y2 - G(y1), dx1 = dy1 + dG,
    # x1 = y1 - F(x2), dx2 = dy2 + dF, in the memory of y1, y2, dy1 and dy2 where the caller gave them up
    # (reuse_outputs), else in copies of them (the caller's are held by autograd until this returns).
    if not reuse_outputs:
        y1, y2, dy1, dy2 = (t.clone(memory_format=torch.contiguous_format) for t in (y1, y2, dy1, dy2))
    with torch._C._ForceDispatchKeyGuard(*_EAGER_KEYS):
        for i, block in reversed(list(enumerate(module.blocks))):
            recompute(block.feed_forward, 2 * i + 1, y1, y2, dy1, dy2, chunk_size=block.feed_forward.chunk_size)
            recompute(block.attention, 2 * i, y2, y1, dy2, dy1, key_valid, n_hashes)
    return [dy1, dy2, *(torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads, strict=True))]


@torch.library.register_fake(reversible_backward)
def _(dy1, dy2, y1, y2, key_valid, cpu_states, cuda_states, hash_calls, stack, n_hashes, autocast, autocast_dtype,
      reuse_outputs):
    params = _stack(stack).trained_parameters()
    return [torch.empty_like(dy1), torch.empty_like(dy2),
            *(torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params)]


def _save(ctx, inputs, output) -> None:
    _, _, key_valid, _, *options = inputs
    y1, y2, cpu_states, cuda_states, hash_calls = output
    ctx.save_for_backward(y1, y2, key_valid, cpu_states, cuda_states, hash_calls)
    ctx.mark_non_differentiable(cpu_states, cuda_states, hash_calls)
    ctx.set_materialize_grads(False)   # (dy1 or dy2 may then be None: one half unused downstream)
    ctx.options = options


def _backward(ctx, dy1, dy2, *_):
    y1, y2 = ctx.saved_tensors[:2]
    dy1 = torch.zeros_like(y1) if dy1 is None else dy1
    dy2 = torch.zeros_like(y2) if dy2 is None else dy2
    dx1, dx2, *param_grads = reversible_backward(dy1, dy2, *ctx.saved_tensors, *ctx.options)
    return dx1, dx2, None, param_grads, *(None for _ in ctx.options)   # nothing for the options


torch.library.register_autograd(reversible_forward, _backward, setup_context=_save)


class ReversibleStack(nn.Module):
    """The blocks of a model, run reversibly (activations kept once) or with plain autograd.

    forward(x1, x2 (batch, length, d_model), key_valid (batch, length) bool or None, n_hashes=None)
    -> (y1, y2). Both modes compute the same function with the same randomness.
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ReversibleBlock(config, i) for i in range(config.n_layers))
        self.reversible = config.reversible
        self.dropouts = (config.dropout, config.attention_dropout, config.local_attention_dropout)
        self._number, self._owner = None, None
        self.number()

    def number(self) -> int:
        """The stack's number in the registry the operators read, registered on first use (again for a copy:
        a deep copy or an unpickled stack carries its original's number, but not its identity)."""
        if self._owner != id(self):
            self._number, self._owner = next(_NUMBERS), id(self)
            _STACKS[self._number] = self
        return self._number

    def draws_randomness(self) -> bool:
        """Whether a forward of the blocks draws from the global RNG (dropout in training)."""
        return self.training and any(self.dropouts)

    def trained_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None, reuse_outputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``reuse_outputs``: the caller promises that nothing reads y1 and y2 after its own backward, and
        that their gradients reach the stack in tensors nothing else holds (ReformerLM's head: its
        cross-entropy and logits are the only readers). The backward then rebuilds the blocks in their
        memory, four (batch, length, d_model) tensors fewer at its peak. Ignored inside a compiled graph,
        which does not see the operator write its inputs."""
        params = self.trained_parameters()
        if self.reversible and torch.is_grad_enabled() and (params or x1.requires_grad or x2.requires_grad):
            device = x1.device.type
            reuse = reuse_outputs and not torch.compiler.is_compiling()
            y1, y2, *_ = reversible_forward(x1, x2, key_valid, params, self.number(), n_hashes,
                                            torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                                            reuse)
            return y1, y2
        for block in self.blocks:
            x1, x2 = block(x1, x2, key_valid, n_hashes)
        return x1, x2
