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
