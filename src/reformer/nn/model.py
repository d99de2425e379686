"""ReformerLM: token and position embeddings -> reversible stack -> LayerNorm -> vocabulary head.

The layout follows transformers' Reformer, so that its checkpoints load unchanged: the embedding x is
duplicated into the two reversible halves (x, x), the blocks map them to (y1, y2), and the head reads
LayerNorm(cat(y1, y2)) of width 2 * d_model. With ``causal=True`` it is a language model (the logits
at t predict token t + 1); with ``causal=False`` the same class is a bidirectional encoder with a
masked-LM head.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import weights
from ..config import ReformerConfig
from .head import IGNORE_INDEX, head_loss
from .layers import position_embedding
from .reversible import ReversibleStack


def _check_values(t: torch.Tensor, holds: torch.Tensor, message: str) -> None:
    """ValueError(message) unless ``holds`` (a bool tensor computed from t) is all True. Inside a compiled
    graph, or off the CPU (reading a value off a GPU waits for it), an asynchronous assert where it runs;
    meta tensors hold no values to check."""
    if t.device.type == "meta":
        return
    if torch.compiler.is_compiling() or t.device.type != "cpu":
        torch._assert_async(holds.all(), message)
    elif not bool(holds.all()):
        raise ValueError(message)


class ReformerLM(nn.Module):
    """A Reformer language model (or masked-LM encoder when ``config.causal`` is False).

    model(input_ids (batch, length) int64, attention_mask (batch, length) of 0/1 or bool, n_hashes=None)
    -> logits (batch, length, vocab_size). Any length up to ``config.max_seq_len`` works: inputs are
    padded internally to the chunk multiple and the padding is masked. ``n_hashes`` overrides the
    number of hashing rounds of every LSH layer for this call.
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = position_embedding(config)
        self.stack = ReversibleStack(config)
        self.norm = nn.LayerNorm(2 * config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(2 * config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- model folders --------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (with checksums, weights.py) to ``folder``."""
        weights.save_folder(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "ReformerLM":
        """The model saved in ``folder`` (by save_pretrained, or a run folder of ``reformer train``), in eval
        mode. Raises weights.WeightsError naming the file when a file is missing, corrupted, or the weights
        were saved for another config."""
        folder = Path(folder)
        config = weights.read_config(folder)
        model = cls(config)
        path = folder / weights.WEIGHTS_FILE
        weights.load_into(model, weights.load_weights(path, config), path)
        return model.to(device).eval()

    # -- input checks ---------------------------------------------------------------------------------
    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     n_hashes: int | None = None) -> torch.Tensor | None:
        """Validate the inputs; return the attention mask as bool (None when there is none)."""
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor (torch.long), got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise ValueError(f"input_ids must hold at least one token, got shape {tuple(input_ids.shape)}")
        if length > cfg.max_seq_len:
            raise ValueError(f"input length {length} exceeds config.max_seq_len={cfg.max_seq_len}")
        in_vocabulary = f"input_ids must lie in [0, vocab_size={cfg.vocab_size})"
        _check_values(input_ids, (input_ids >= 0) & (input_ids < cfg.vocab_size), in_vocabulary)
        if n_hashes is not None and (isinstance(n_hashes, bool) or not isinstance(n_hashes, int)
                                     or n_hashes < 1):
            raise ValueError(f"n_hashes must be a positive int or None, got {n_hashes!r}")
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool:
            binary = "attention_mask must hold only 0 and 1 (or be a bool tensor)"
            if attention_mask.dtype.is_complex:
                raise ValueError(binary)
            _check_values(attention_mask, (attention_mask == 0) | (attention_mask == 1), binary)
            attention_mask = attention_mask != 0
        return attention_mask.to(input_ids.device)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                n_hashes: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (batch, length, vocab_size); with ``labels``, the mean cross-entropy against them as
        ``loss`` computes it (through forward, so that a DistributedDataParallel wrapper sees the call)."""
        if labels is not None:
            return self.loss(input_ids, attention_mask, labels, n_hashes)
        key_valid = self.check_inputs(input_ids, attention_mask, n_hashes)
        return self.logits(*self._hidden_states(input_ids, key_valid, n_hashes, private=True))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      n_hashes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves (y1, y2) of the last block's output, each (batch, length, d_model)."""
        return self._hidden_states(input_ids, self.check_inputs(input_ids, attention_mask, n_hashes), n_hashes)

    def _hidden_states(self, input_ids: torch.Tensor, key_valid: torch.Tensor | None, n_hashes: int | None,
                       private: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``private``: the halves go to the head only, never to the caller, so the stack's backward may
        rebuild its blocks in their memory (ReversibleStack.forward's reuse_outputs)."""
        input_ids = input_ids.long()   # any integer dtype (uint8 bytes, int32) indexes the embedding
        cfg = self.config
        length = input_ids.shape[1]
        extra = -length % cfg.pad_multiple
        if extra:
            # Pad once here, so every chunked layer sees a multiple of its chunk length. A causal model
            # with the bucket window needs no mask for it: the padding comes after every real query, and
            # in that window (bands.py) a query reaches earlier positions only, in every layer kind. Without
            # the mask the compiled core also serves local layers at such lengths.
            input_ids = F.pad(input_ids, (0, extra))
            if key_valid is not None or not (cfg.causal and cfg.lsh_window == "bucket"):
                valid = torch.ones_like(input_ids[:, :length], dtype=torch.bool) if key_valid is None else key_valid
                key_valid = F.pad(valid, (0, extra), value=False)

        x = self.embed(input_ids, torch.arange(input_ids.shape[1], device=input_ids.device))
        y1, y2 = self.stack(x, x, key_valid, n_hashes, reuse_outputs=private)
        if length == y1.shape[1]:
            return y1, y2
        return y1[:, :length], y2[:, :length]

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings: (batch, length) ids at (length,) positions -> (batch, length, d)."""
        x = F.dropout(self.token_embedding(input_ids), self.config.dropout, self.training)
        if self.position_embedding is not None:
            # Padding may run past max_seq_len; its positions are never read, so clamp them.
            x = x + self.position_embedding(positions.clamp(max=self.config.max_seq_len - 1))
        return x

    def logits(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from the two halves of the last block: (batch, length, vocab_size)."""
        return self._head(y1, y2, *self._head_parameters())

    def _head_parameters(self) -> list[torch.Tensor]:
        return [self.norm.weight, self.norm.bias, self.head.weight, self.head.bias]

    def _head(self, y1: torch.Tensor, y2: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
              head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
        """LayerNorm -> dropout -> head on cat(y1, y2), with the given parameters (head.head_loss passes
        detached copies of the module's own)."""
        hidden = F.layer_norm(torch.cat([y1, y2], dim=-1), (2 * self.config.d_model,), norm_weight, norm_bias,
                              self.config.layer_norm_eps)
        return F.linear(F.dropout(hidden, self.config.dropout, self.training), head_weight, head_bias)

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, n_hashes: int | None = None) -> torch.Tensor:
        """Mean cross-entropy.

        Causal models: next-token prediction, logits at t against ``labels`` (default ``input_ids``) at
        t + 1. Encoders: masked-LM, logits at t against ``labels`` at t, which is required; label -100
        is ignored. Positions masked out by ``attention_mask`` never count as targets. With
        ``config.head_chunk_size`` the head and loss run that many positions at a time (head.py).
        """
        key_valid = self.check_inputs(input_ids, attention_mask, n_hashes)
        if labels is None:
            if not self.config.causal:
                raise ValueError("labels are required for the masked-LM loss of a non-causal model")
            labels = input_ids
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(labels, 'shape', ()))}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (torch.long), got {labels.dtype}")
        labels = labels.long()
        vocab = self.config.vocab_size
        _check_values(labels, ((labels >= 0) & (labels < vocab)) | (labels == IGNORE_INDEX),
                      f"labels must lie in [0, vocab_size={vocab}) or be {IGNORE_INDEX} (ignored)")
        if key_valid is not None:
            labels = labels.masked_fill(~key_valid, IGNORE_INDEX)
        if self.config.causal:
            if input_ids.shape[1] < 2:
                raise ValueError("next-token loss needs sequences of at least 2 tokens")
            # The target of position t is the label at t + 1; the last position has none.
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        # A mean over no target is 0 / 0: refused rather than returned as NaN.
        _check_values(labels, (labels != IGNORE_INDEX).any(), "the loss has no target: every label is "
                      f"{IGNORE_INDEX} or masked out by attention_mask")
        y1, y2 = self._hidden_states(input_ids, key_valid, n_hashes, private=True)
        return head_loss(self._head, self._head_parameters(), y1, y2, labels, self.config.head_chunk_size)
