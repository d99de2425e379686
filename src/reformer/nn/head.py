"""The vocabulary head's cross-entropy, over the whole sequence or a chunk of positions at a time.

The head reads LayerNorm(cat(y1, y2)) and projects it to the vocabulary. At a million positions its
input is a (length, 2 * d_model) tensor and its logits (length, vocab_size), 2 GiB and 1 GiB in float32
for the default model, and autograd would keep both plus the softmax until the backward. In chunks the
loss keeps none of them: ``head_loss`` runs norm, head and cross-entropy on ``chunk`` positions at a time
and differentiates each chunk at once (the loss is a sum over positions, so each chunk's gradient is
final when its forward is done). What it stores for the backward is the gradient of y1 and y2, which
the backward of the stack needs anyway, and the head's parameter gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# hidden_logits(y1, y2, *head parameters) -> (batch, positions, vocab) logits
HeadFunction = Callable[..., torch.Tensor]


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (batch, length, vocab) against labels (batch, length) at the same positions,
    in float32; label IGNORE_INDEX (-100) is ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits at t against the labels at t + 1: (batch, length, vocab), (batch, length)."""
    return token_loss(logits[:, :-1], labels[:, 1:], reduction)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of head(y1, y2) against targets, chunk by chunk, gradients made in forward."""

    @staticmethod
    def forward(ctx, y1, y2, targets, chunk, head, *params):
        leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
        trained = [p for p in leaves if p.requires_grad]
        d_y1, d_y2 = torch.empty_like(y1), torch.empty_like(y2)
        d_params = [torch.zeros_like(p) for p in trained]
        total = torch.zeros((), dtype=torch.float32, device=y1.device)
        for start in range(0, y1.shape[1], chunk):
            part = slice(start, start + chunk)
            with torch.enable_grad():
                a = y1[:, part].detach().requires_grad_(True)
                b = y2[:, part].detach().requires_grad_(True)
                loss = token_loss(head(a, b, *leaves), targets[:, part], reduction="sum")
            grads = torch.autograd.grad(loss, [a, b, *trained])
            d_y1[:, part], d_y2[:, part] = grads[0], grads[1]
            for total_grad, grad in zip(d_params, grads[2:], strict=True):
                total_grad += grad
            total += loss.detach()
        ctx.save_for_backward(d_y1, d_y2, *d_params)
        ctx.trained = [p.requires_grad for p in params]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        d_y1, d_y2, *d_params = ctx.saved_tensors
        d_params = iter(d_params)
        param_grads = [next(d_params) * grad_total if trained else None for trained in ctx.trained]
        return (d_y1 * grad_total.to(d_y1.dtype), d_y2 * grad_total.to(d_y2.dtype), None, None, None,
                *param_grads)


def head_loss(head: HeadFunction, params: list[torch.Tensor], y1: torch.Tensor, y2: torch.Tensor,
              targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of head(y1, y2, *params) against targets, ``chunk`` positions at a time.

    y1, y2: (batch, length, d) the halves of the last block; targets: (batch, length) int64 with
    IGNORE_INDEX where there is no target (at least one target must remain); chunk: positions per chunk
    (0 = all at once). The same loss and gradients as the whole head, up to float rounding. A compiled
    graph runs the whole head (the chunks differentiate inside forward, which torch.compile does not trace).
    """
    if not chunk or y1.shape[1] <= chunk or torch.compiler.is_compiling():
        return token_loss(head(y1, y2, *params), targets)
    count = (targets != IGNORE_INDEX).sum()
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (y1, y2, *params))
    if differentiable:
        total = _ChunkedHeadLoss.apply(y1, y2, targets, chunk, head, *params)
    else:
        total = sum(token_loss(head(y1[:, s:s + chunk], y2[:, s:s + chunk], *params), targets[:, s:s + chunk],
                               reduction="sum") for s in range(0, y1.shape[1], chunk))
    return total / count
