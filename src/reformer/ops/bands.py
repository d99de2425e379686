"""Who attends to whom: the window of chunks a query sees, and the rule that masks inside it.

The sequence an attention core works on (bucket-sorted for LSH, as it is for local attention) is cut into
chunks of ``chunk_length``; the queries of chunk k see the keys of chunks k - before ... k + after. The
rule says what is masked inside that window:

- "bucket" (LSH, ours): only keys of the query's own bucket, within before * chunk_length items before
  (after * chunk_length after) it in the sorted order; the query itself only when nothing else is
  allowed. What a position sees then depends on earlier positions alone.
- "local" (ours): every key of the window; windows stop at the ends of the sequence.
- "anchor-lsh", "anchor-local": the anchors' (trax, transformers) semantics, for checkpoint parity: whole
  chunks, the window of the first chunk wrapping around to the last one, hidden logits replaced by
  transformers' constants; "anchor-lsh" also replaces every self logit by its -1e5.
Causal masking (keys at later original positions hidden) and padding come on top of any rule.
"""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("bucket", "local", "anchor-lsh", "anchor-local")


@dataclass(frozen=True)
class Window:
    """Chunk length and the neighbouring chunks a query's chunk sees: W = (before + 1 + after) * c keys."""

    chunk_length: int
    before: int
    after: int

    @property
    def width(self) -> int:
        return (self.before + 1 + self.after) * self.chunk_length

    def in_half_chunks(self) -> "Window":
        """The same reach (before * c items back, after * c ahead) in chunks half as long, where c is even.

        What a bucket-window query sees depends only on that reach, not on where chunk boundaries fall, so
        the interval core may cut half chunks: a causal query then scores (2 before + 1) c / 2 keys instead
        of (before + 1) c."""
        c = self.chunk_length
        return self if c % 2 else Window(c // 2, 2 * self.before, 2 * self.after)


@dataclass(frozen=True)
class Band:
    """A window, causal or not, and the rule inside it (see the module's docstring)."""

    window: Window
    causal: bool
    rule: str

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"Band.rule must be one of {RULES}, got {self.rule!r}")
        if self.rule == "bucket" and self.window.after and self.causal:
            raise ValueError("a causal bucket band sees no chunks after its own (window.after must be 0)")

    @property
    def chunk_length(self) -> int:
        return self.window.chunk_length

    @property
    def before(self) -> int:
        return self.window.before

    @property
    def after(self) -> int:
        return self.window.after

    @property
    def width(self) -> int:
        return self.window.width

    @property
    def wrap(self) -> bool:
        """The window of the first chunk wraps around to the last one."""
        return self.rule.startswith("anchor")

    @property
    def anchor_masks(self) -> bool:
        """Hidden and self logits are replaced by transformers' constants instead of masked exactly."""
        return self.rule.startswith("anchor")

    @property
    def same_bucket(self) -> bool:
        return self.rule == "bucket"

    @property
    def mask_self(self) -> bool:
        """Shared query-key attention: a query attends to itself only when nothing else is allowed."""
        return self.rule in ("bucket", "anchor-lsh")
