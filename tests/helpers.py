"""Shared helpers for the tests: small configs and reference implementations."""

from __future__ import annotations

import subprocess

import torch

from reformer import ReformerConfig
from reformer.ops.keys import normalize_keys
from reformer.ops.layout import merge_heads, split_heads


def tiny(**overrides) -> ReformerConfig:
    """A small config: 2 heads x 16, chunk 8, several hashing rounds."""
    base = dict(vocab_size=64, d_model=32, n_heads=2, d_head=16, n_layers=2, d_ff=64, n_hashes=2,
                chunk_length=8, max_seq_len=256)
    base.update(overrides)
    return ReformerConfig(**base)


def full_shared_qk_attention(layer, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain O(L^2) shared-QK attention with the weights of an LSHSelfAttention layer.

    Keys are the normalised queries, a query attends to itself only when it has no other target.
    """
    qk = split_heads(layer.qk(x), layer.n_heads)
    v = split_heads(layer.v(x), layer.n_heads)
    logits = qk @ normalize_keys(qk).transpose(-1, -2)
    length = x.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    is_self = torch.eye(length, dtype=torch.bool)
    other = allowed & ~is_self
    allowed = other | (is_self & ~other.any(-1, keepdim=True))
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return layer.out(merge_heads(probs @ v))


def run_in_process(args, capsys) -> subprocess.CompletedProcess:
    """The ``reformer`` command run in this process (no interpreter start-up): returncode, stdout, stderr."""
    from reformer.cli import main

    capsys.readouterr()
    threads = torch.get_num_threads()   # the command sets torch's threads for its process: restored here
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)
