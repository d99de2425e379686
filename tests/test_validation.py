"""Every bad config value and every bad input raises a clear ValueError / TypeError naming it."""

import pytest
import torch

from helpers import tiny
from reformer import ReformerConfig, ReformerLM

BAD_CONFIGS = [
    (dict(n_buckets=3), ValueError, "n_buckets"),
    (dict(n_buckets=0), ValueError, "n_buckets"),
    (dict(n_buckets=(4, 5)), ValueError, "n_buckets"),
    (dict(n_buckets=(4, 4, 4)), ValueError, "n_buckets"),
    (dict(n_buckets="many"), ValueError, "n_buckets"),
    (dict(attn_layers="dense"), ValueError, "attn_layers"),
    (dict(attn_layers=("lsh",)), ValueError, "attn_layers"),
    (dict(attn_layers=("lsh", "sparse")), ValueError, "attn_layers"),
    (dict(d_model=-4), ValueError, "d_model"),
    (dict(n_heads=0), ValueError, "n_heads"),
    (dict(d_head=2.5), TypeError, "d_head"),
    (dict(n_layers=True), TypeError, "n_layers"),
    (dict(chunk_length=0), ValueError, "chunk_length"),
    (dict(n_chunks_before=-1), ValueError, "n_chunks_before"),
    (dict(n_chunks_after=1), ValueError, "n_chunks_after"),           # causal model
    (dict(local_n_chunks_after=2), ValueError, "local_n_chunks_after"),
    (dict(lsh_window="ring"), ValueError, "lsh_window"),
    (dict(position_embedding="rotary"), ValueError, "position_embedding"),
    (dict(axial_shape=(8, 8)), ValueError, "axial_shape"),           # 64 < max_seq_len 256
    (dict(axial_shape=(256,)), ValueError, "axial_shape"),
    (dict(axial_shape=(16, 16), axial_dims=(16, 8)), ValueError, "axial_dims"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(attention_dropout=-0.1), ValueError, "attention_dropout"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(layer_norm_eps=0), ValueError, "layer_norm_eps"),
    (dict(causal="yes"), ValueError, "causal"),
    (dict(hash_seed=-1), ValueError, "hash_seed"),
    (dict(max_seq_len=0), ValueError, "max_seq_len"),
    (dict(layer_norm_eps=float("inf")), ValueError, "layer_norm_eps"),
    (dict(init_std=float("inf")), ValueError, "init_std"),
    (dict(init_std=float("nan")), ValueError, "init_std"),
    (dict(hash_seed=2**64), ValueError, "hash_seed"),
    # Tables no machine allocates are refused here, not attempted (a 35 TB allocation before).
    (dict(max_seq_len=2**40, position_embedding="learned"), ValueError, "max_seq_len"),
    (dict(max_seq_len=2**30, position_embedding="learned"), ValueError, "max_seq_len"),
    (dict(n_buckets=2**30), ValueError, "n_buckets"),
    (dict(vocab_size=2**40), ValueError, "vocab_size"),
]


@pytest.mark.parametrize("overrides,error,field", BAD_CONFIGS)
def test_bad_config_values_name_the_field(overrides, error, field):
    with pytest.raises(error, match=field):
        tiny(**overrides)


def test_config_derivations_and_round_trip():
    cfg = tiny(causal=False, n_buckets=None, max_seq_len=1024, chunk_length=64)
    assert cfg.n_buckets == 32 and cfg.n_chunks_after == 1
    assert cfg.axial_shape == (32, 32) and sum(cfg.axial_dims) == cfg.d_model
    assert ReformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ReformerConfig fields"):
        ReformerConfig.from_dict({"hidden_size": 3})


@pytest.mark.parametrize("name", ["tiny", "small", "enwik8", "duplication"])
def test_presets_are_valid(name):
    cfg = ReformerConfig.preset(name)
    assert cfg.n_layers == len(cfg.attn_layers)
    assert ReformerConfig.preset(name, dropout=0.0).dropout == 0.0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        ReformerConfig.preset("huge")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReformerLM(tiny(max_seq_len=64, axial_shape=(8, 8))).eval()


BAD_INPUTS = [
    (lambda: [[1, 2, 3]], None, TypeError, "input_ids must be a torch.Tensor"),
    (lambda: torch.rand(1, 5), None, TypeError, "integer"),
    (lambda: torch.ones(1, 5, dtype=torch.bool), None, TypeError, "integer"),
    (lambda: torch.ones(5, dtype=torch.long), None, ValueError, r"shape \(batch, length\)"),
    (lambda: torch.ones(1, 2, 5, dtype=torch.long), None, ValueError, r"shape \(batch, length\)"),
    (lambda: torch.ones(1, 0, dtype=torch.long), None, ValueError, "at least one token"),
    (lambda: torch.ones(1, 65, dtype=torch.long), None, ValueError, "max_seq_len"),
    (lambda: torch.full((1, 5), 64), None, ValueError, "vocab_size"),
    (lambda: torch.full((1, 5), -1), None, ValueError, "vocab_size"),
    (lambda: torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4), ValueError, "attention_mask must have"),
    (lambda: torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), 2), ValueError, "only 0 and 1"),
    (lambda: torch.ones(2, 5, dtype=torch.long), [[1] * 5] * 2, TypeError, "attention_mask must be"),
    (lambda: torch.full((1, 5), 200, dtype=torch.uint8), None, ValueError, "vocab_size"),
]


@pytest.mark.parametrize("make_ids,mask,error,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(model, make_ids, mask, error, message):
    with pytest.raises(error, match=message):
        model(make_ids(), attention_mask=mask)


def test_bad_n_hashes(model):
    with pytest.raises(ValueError, match="n_hashes"):
        model(torch.ones(1, 5, dtype=torch.long), n_hashes=0)


def test_model_needs_a_config():
    with pytest.raises(TypeError, match="ReformerConfig"):
        ReformerLM({"d_model": 4})


def test_next_token_loss_needs_two_tokens(model):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.loss(torch.ones(1, 1, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_any_integer_ids_equal_long_ids(model, dtype):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(dtype)), model(ids), rtol=0, atol=0)


def test_input_checks_never_read_the_values_of_meta_tensors(model):
    """Meta tensors (shape tracing) have no values: the checks skip what would read them."""
    ids = torch.ones(2, 16, dtype=torch.long, device="meta")
    mask = model.check_inputs(ids, torch.ones(2, 16, device="meta"))
    assert mask.dtype == torch.bool and mask.device.type == "meta"


@pytest.mark.parametrize("labels,error,message", [
    (torch.rand(1, 6), TypeError, "labels must be an integer"),
    (torch.full((1, 6), 64), ValueError, "labels must lie in"),
    (torch.full((1, 6), -5), ValueError, "labels must lie in"),
    (torch.ones(1, 5, dtype=torch.long), ValueError, "labels must be a tensor of the shape"),
])
def test_bad_labels(model, labels, error, message):
    with pytest.raises(error, match=message):
        model.loss(torch.ones(1, 6, dtype=torch.long), labels=labels)


def test_a_loss_without_targets_is_an_error_not_nan(model):
    """An all-zero attention_mask (or only ignored labels) leaves no target: 0 / 0 would be NaN."""
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="no target"):
        model.loss(ids, attention_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="no target"):
        model.loss(ids, labels=torch.full((2, 6), -100))
    assert torch.isfinite(model.loss(ids, attention_mask=torch.tensor([[1, 1, 0, 0, 0, 0]] * 2)))


def _layers():
    from reformer import FullSelfAttention, LocalSelfAttention, LSHSelfAttention

    config = tiny()
    return [cls(config) for cls in (LSHSelfAttention, LocalSelfAttention, FullSelfAttention)]


@pytest.mark.parametrize("layer", _layers(), ids=lambda layer: type(layer).__name__)
@pytest.mark.parametrize("x,key_valid,message", [
    (lambda: torch.randn(2, 16, 31), None, r"shape \(batch, length, d_model=32\)"),
    (lambda: torch.randn(16, 32), None, r"shape \(batch, length, d_model=32\)"),
    (lambda: torch.randn(2, 0, 32), None, "at least one position"),
    (lambda: torch.ones(2, 16, 32, dtype=torch.long), None, "floating-point"),
    (lambda: torch.randn(2, 16, 32, dtype=torch.float64), None, "weights are torch.float32"),
    (lambda: torch.randn(2, 16, 32), torch.ones(2, 16), "key_valid must be a bool tensor"),
    (lambda: torch.randn(2, 16, 32), torch.ones(2, 15, dtype=torch.bool), r"key_valid must have shape"),
    (lambda: torch.randn(2, 16, 32), torch.ones(16, dtype=torch.bool), r"key_valid must have shape"),
])
def test_layers_check_their_inputs(layer, x, key_valid, message):
    with pytest.raises(ValueError, match=message):
        layer(x(), key_valid)
