"""ReformerConfig: one typed dataclass that validates itself, with named presets.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` (or ``TypeError`` for a
value of the wrong kind) that names the field and says what is allowed. Derived values (the number of
buckets when ``n_buckets`` is None, the per-layer attention kinds, the axial shape) are resolved there
too, so that a config that exists is a config that works.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from .ops.backend import ATTENTION_BACKENDS, check_backend
from .ops.hashing import SEED_LIMIT, rotation_width

ATTENTION_KINDS = ("lsh", "local", "full")
LSH_WINDOWS = ("bucket", "chunk")
POSITION_EMBEDDINGS = ("axial", "learned", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
MAX_LENGTH = 2**31       # positions and buckets: int32-sized (far beyond what fits in memory anyway)
MAX_BUCKETS = 2**24      # per round; the sort counts them per sequence
MAX_TABLE = 2**34        # elements of one weight table (64 GiB in float32)


PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=32, n_heads=2, d_head=16, n_layers=2, d_ff=64,
                 n_hashes=2, chunk_length=8, max_seq_len=256),
    "small": dict(vocab_size=256, d_model=128, n_heads=4, d_head=32, n_layers=4, d_ff=512,
                  attn_layers=("local", "lsh", "local", "lsh"), n_hashes=2, chunk_length=32,
                  max_seq_len=1024),
    "enwik8": dict(vocab_size=258, d_model=1024, n_heads=8, d_head=128, n_layers=12, d_ff=4096,
                   attn_layers=("local", "local", "lsh", "local") * 3, n_hashes=4,
                   chunk_length=256, local_chunk_length=128, max_seq_len=65536,
                   axial_shape=(128, 512), axial_dims=(256, 768), dropout=0.1),
    "duplication": dict(vocab_size=128, d_model=256, n_heads=4, d_head=64, n_layers=1, d_ff=512,
                        n_hashes=4, chunk_length=64, max_seq_len=1024, position_embedding="learned"),
}
PRESETS = tuple(sorted(PRESET_FIELDS))


def _fail(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"ReformerConfig.{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ReformerConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise _fail(name, f"an int >= {minimum}", value)


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"ReformerConfig.{name} must be a float, got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise _fail(name, "a probability in [0, 1)", value)


def transformers_n_buckets(length: int, chunk_length: int, factorise: bool = True) -> int | tuple[int, int]:
    """transformers' rule for num_buckets=None: 2^floor(log2(2 L / chunk)) buckets, at least 2, and, with
    ``factorise``, split into two factors (2^floor(p / 2), 2^ceil(p / 2)) above 2 max(sqrt(L / chunk), chunk).

    The config's default applies it, unfactorised, to the configured maximum length once, not to the length
    of whatever batch comes first: the bucket count then never depends on the input, which is what keeps
    hashing (and so every output) independent of later tokens.
    """
    power = max(1, int(math.floor(math.log2(max(2, 2 * length // chunk_length)))))
    limit = 2 * max(int((length // chunk_length) ** 0.5), chunk_length)
    if factorise and 2**power > limit:
        return 2 ** (power // 2), 2 ** (power - power // 2)
    return 2**power


@dataclass
class ReformerConfig:
    """Hyper-parameters of a Reformer model.

    Model size
        vocab_size: number of token ids (256 for bytes).
        d_model: width of the residual stream (each of the two reversible halves).
        n_heads, d_head: attention heads and the width of each; n_heads * d_head need not equal d_model.
        n_layers: number of blocks (attention + feed-forward).
        d_ff: hidden width of the feed-forward layers.
        activation: feed-forward non-linearity, one of "relu", "gelu", "gelu_new" (tanh form), "silu".

    Attention
        attn_layers: "lsh", "local" or "full" for every layer, or a sequence with one name per layer.
        n_hashes: LSH hashing rounds.
        n_buckets: buckets per round: an even int, 1 (no hashing), a pair [a, b] of even ints
            (factorised buckets, a * b in total) or None (derived from max_seq_len and chunk_length).
        chunk_length, n_chunks_before, n_chunks_after: the LSH band. Every query sees its chunk of the
            sorted sequence plus n_chunks_before chunks before and n_chunks_after after. n_chunks_after
            must be 0 for causal models (later chunks are masked anyway); None means 0 when causal, else
            n_chunks_before.
        local_chunk_length, local_n_chunks_before, local_n_chunks_after: the same for local layers;
            None means "as for LSH".
        lsh_window: "bucket" (default): a query attends to the members of its own bucket among the
            previous n_chunks_before * chunk_length items of the sorted sequence (and the next
            n_chunks_after * chunk_length), never across rounds. What a position sees depends on earlier
            positions only, so causal models are strictly causal and cached decoding is exact.
            "chunk": the anchors' (trax, transformers) semantics: whole neighbouring chunks of the sorted
            sequence, wrapping around from the first chunk of a round to the last chunk of the one before;
            local layers wrap around too. For checkpoint parity with transformers.
        causal: decoder (True) or bidirectional encoder (False).
        hash_seed: seed of the hashing rotations, below 2^63. Evaluation hashes with rotations drawn from
            it alone (as transformers does); training draws fresh rotations on each call from (hash_seed,
            layer, call number). Hashing never touches the global torch RNG.
        attention_backend: which attention core runs (ops/backend.py): "auto" (the compiled core on the
            CPU in float32 and float64, FlexAttention on CUDA, the eager core elsewhere), "native",
            "flex" or "eager". The cores compute the same function; a backend this machine lacks, or
            one that cannot serve the config (the anchors' chunk window, attention dropout), is refused.

    Layers
        reversible: reversible residual stack (activations stored once) or plain autograd.
        ff_chunk_size: positions per feed-forward chunk (0 = the whole sequence at once).
        head_chunk_size: positions per chunk of the vocabulary head and its loss in ReformerLM.loss
            (0 = the whole sequence at once): the (length, vocab_size) logits then never exist whole.
        position_embedding: "axial", "learned" or "none".
        axial_shape: factors of the axial embedding, their product >= max_seq_len; None picks two
            factors near sqrt(max_seq_len).
        axial_dims: widths of the axial factors, summing to d_model; None splits d_model in halves.
        max_seq_len: longest sequence the model accepts.
        dropout: dropout on embeddings, residual branches and the final norm.
        attention_dropout: dropout on attention probabilities (LSH and full layers).
        local_attention_dropout: the same for local layers; None means attention_dropout.
        layer_norm_eps: LayerNorm epsilon (1e-12 as in transformers).
        init_std, axial_init_std: standard deviations of the weight initialisers.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    d_head: int = 64
    n_layers: int = 6
    d_ff: int = 1024
    activation: str = "relu"
    attn_layers: str | Sequence[str] = "lsh"
    n_hashes: int = 2
    n_buckets: int | Sequence[int] | None = None
    chunk_length: int = 64
    n_chunks_before: int = 1
    n_chunks_after: int | None = None
    local_chunk_length: int | None = None
    local_n_chunks_before: int | None = None
    local_n_chunks_after: int | None = None
    lsh_window: str = "bucket"
    causal: bool = True
    hash_seed: int = 0
    attention_backend: str = "auto"
    reversible: bool = True
    ff_chunk_size: int = 0
    head_chunk_size: int = 0
    position_embedding: str = "axial"
    axial_shape: Sequence[int] | None = None
    axial_dims: Sequence[int] | None = None
    max_seq_len: int = 4096
    dropout: float = 0.0
    attention_dropout: float = 0.0
    local_attention_dropout: float | None = None
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    axial_init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "d_head", "n_layers", "d_ff", "n_hashes",
                     "chunk_length", "max_seq_len"):
            _check_int(name, getattr(self, name), 1)
        _check_int("n_chunks_before", self.n_chunks_before, 0)
        _check_int("ff_chunk_size", self.ff_chunk_size, 0)
        _check_int("head_chunk_size", self.head_chunk_size, 0)
        _check_int("hash_seed", self.hash_seed, 0)
        if self.hash_seed >= SEED_LIMIT:
            raise _fail("hash_seed", "an int in [0, 2^63)", self.hash_seed)
        if self.local_attention_dropout is None:
            self.local_attention_dropout = self.attention_dropout
        for name in ("dropout", "attention_dropout", "local_attention_dropout"):
            _check_probability(name, getattr(self, name))
        for name in ("layer_norm_eps", "init_std", "axial_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise _fail(name, "a positive finite float", value)
        for name in ("causal", "reversible"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "True or False", getattr(self, name))
        if self.activation not in ACTIVATIONS:
            raise _fail("activation", f"one of {ACTIVATIONS}", self.activation)
        if self.lsh_window not in LSH_WINDOWS:
            raise _fail("lsh_window", f"one of {LSH_WINDOWS}", self.lsh_window)
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise _fail("position_embedding", f"one of {POSITION_EMBEDDINGS}", self.position_embedding)

        self.attn_layers = self._resolve_attn_layers(self.attn_layers)
        self.n_buckets = self._resolve_n_buckets(self.n_buckets)
        self.n_chunks_after = self._resolve_chunks_after("n_chunks_after", self.n_chunks_after,
                                                         self.n_chunks_before)
        if self.local_chunk_length is None:
            self.local_chunk_length = self.chunk_length
        _check_int("local_chunk_length", self.local_chunk_length, 1)
        if self.local_n_chunks_before is None:
            self.local_n_chunks_before = self.n_chunks_before
        _check_int("local_n_chunks_before", self.local_n_chunks_before, 0)
        self.local_n_chunks_after = self._resolve_chunks_after(
            "local_n_chunks_after", self.local_n_chunks_after, self.local_n_chunks_before)
        self._resolve_axial()
        self._check_table_sizes()
        self._check_backend()

    # -- derived fields -------------------------------------------------------------------------------
    def _resolve_attn_layers(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = (value,) * self.n_layers
        if not isinstance(value, (list, tuple)):
            raise _fail("attn_layers", f"a name from {ATTENTION_KINDS} or a sequence of them", value)
        value = tuple(value)
        unknown = [v for v in value if v not in ATTENTION_KINDS]
        if unknown:
            raise _fail("attn_layers", f"names from {ATTENTION_KINDS}", unknown)
        if len(value) != self.n_layers:
            raise _fail("attn_layers", f"one name per layer (n_layers={self.n_layers})", value)
        return value

    def _resolve_n_buckets(self, value: Any) -> int | tuple[int, int]:
        if value is None:
            return transformers_n_buckets(self.max_seq_len, self.chunk_length, factorise=False)
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise _fail("n_buckets", "an int or a pair of ints (factorised buckets)", value)
            if any(v < 2 or v % 2 for v in value):
                raise _fail("n_buckets", "a pair of even ints >= 2", value)
            return (value[0], value[1])
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail("n_buckets", "an int, a pair of ints, or None", value)
        if value != 1 and (value < 2 or value % 2):
            raise _fail("n_buckets", "1 or an even int >= 2 (buckets come in +/- pairs)", value)
        return value

    def _resolve_chunks_after(self, name: str, value: Any, before: int) -> int:
        if value is None:
            return 0 if self.causal else before
        _check_int(name, value, 0)
        if self.causal and value:
            raise _fail(name, "0 when causal=True (later chunks are all masked)", value)
        return value

    def _resolve_axial(self) -> None:
        if self.axial_shape is None:
            side = 2 ** math.ceil(math.log2(self.max_seq_len) / 2)
            self.axial_shape = (side, -(-self.max_seq_len // side))
        if not isinstance(self.axial_shape, (list, tuple)) or len(self.axial_shape) < 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.axial_shape):
            raise _fail("axial_shape", "a sequence of two or more positive ints", self.axial_shape)
        self.axial_shape = tuple(self.axial_shape)
        if self.position_embedding == "axial" and math.prod(self.axial_shape) < self.max_seq_len:
            raise _fail("axial_shape", f"factors whose product is >= max_seq_len ({self.max_seq_len})",
                        self.axial_shape)
        if self.axial_dims is None:
            n = len(self.axial_shape)
            self.axial_dims = tuple(self.d_model // n + (i < self.d_model % n) for i in range(n))
        if not isinstance(self.axial_dims, (list, tuple)) or len(self.axial_dims) != len(self.axial_shape) \
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.axial_dims):
            raise _fail("axial_dims", f"{len(self.axial_shape)} positive ints (one per axial factor)",
                        self.axial_dims)
        self.axial_dims = tuple(self.axial_dims)
        if self.position_embedding == "axial" and sum(self.axial_dims) != self.d_model:
            raise _fail("axial_dims", f"widths summing to d_model ({self.d_model})", self.axial_dims)

    def _check_table_sizes(self) -> None:
        """Refuse, up front, sizes whose tables no machine allocates (instead of a failed allocation later).
        max_seq_len is checked first: the derived bucket count grows with it, and it is what was set."""
        if self.max_seq_len > MAX_LENGTH:
            raise _fail("max_seq_len", f"at most 2^{int(math.log2(MAX_LENGTH))}", self.max_seq_len)
        tables = {"max_seq_len": self.max_seq_len * self.d_model if self.position_embedding == "learned" else 0,
                  "vocab_size": self.vocab_size * self.d_model, "d_ff": self.d_ff * self.d_model,
                  "n_heads": self.n_heads * self.d_head * self.d_model,
                  "n_buckets": self.n_heads * self.d_head * self.n_hashes * rotation_width(self.n_buckets)}
        if self.position_embedding == "axial":
            tables["axial_shape"] = max(n * d for n, d in zip(self.axial_shape, self.axial_dims, strict=True))
        for name, elements in tables.items():
            if elements > MAX_TABLE:
                raise _fail(name, f"a size whose weight table holds at most 2^{int(math.log2(MAX_TABLE))} "
                            f"elements (this one: {elements})", getattr(self, name))
        buckets = math.prod(self.n_buckets) if isinstance(self.n_buckets, tuple) else self.n_buckets
        if buckets > MAX_BUCKETS:
            raise _fail("n_buckets", f"at most 2^{int(math.log2(MAX_BUCKETS))} buckets per round", self.n_buckets)

    def _check_backend(self) -> None:
        if not isinstance(self.attention_backend, str) or self.attention_backend not in ATTENTION_BACKENDS:
            raise _fail("attention_backend", f"one of {ATTENTION_BACKENDS}", self.attention_backend)
        check_backend(self.attention_backend)
        if self.attention_backend in ("native", "flex"):
            if self.lsh_window != "bucket":
                raise _fail("attention_backend", "'auto' or 'eager' with lsh_window='chunk' (the anchors' window "
                            "runs on the eager core only)", self.attention_backend)
            if self.attention_dropout or self.local_attention_dropout:
                raise _fail("attention_backend", "'auto' or 'eager' with attention dropout (the native and flex "
                            "cores have none)", self.attention_backend)

    # -- derived properties ---------------------------------------------------------------------------
    @property
    def pad_multiple(self) -> int:
        """Inputs are padded internally to a multiple of this (the lcm of the chunked layers' chunks)."""
        chunks = {"lsh": self.chunk_length, "local": self.local_chunk_length}
        return math.lcm(1, *(chunks[kind] for kind in self.attn_layers if kind in chunks))

    # -- presets and serialisation --------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ReformerConfig":
        """A named configuration; keyword arguments override its fields.

        "tiny": a 2-layer byte model for tests and smoke runs.
        "small": the default of ``reformer train``: 4 layers (local, LSH), d_model 128, chunk 32, 1K context.
        "enwik8": the paper's 12-layer 64K-token byte model, in the layout of google/reformer-enwik8
            (local and LSH layers, 4 hash rounds, d_model 1024, 8 heads x 128, d_ff 4096).
        "duplication": the paper's copy task model: 1 layer, d_model 256, 4 heads, length 1024.
        """
        if name not in PRESET_FIELDS:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
        return cls(**{**PRESET_FIELDS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ReformerConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**data)
