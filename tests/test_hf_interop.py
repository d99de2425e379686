"""Exact parity with HuggingFace transformers' Reformer: import, export, round trip.

No network: the transformers models are built here with random weights.
"""

import json

import pytest
import torch

from reformer import ReformerLM
from reformer.interop.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16,
            feed_forward_size=64, axial_pos_shape=[16, 16], axial_pos_embds_dim=[16, 16],
            max_position_embeddings=256, hash_seed=7, lsh_attn_chunk_length=8, local_attn_chunk_length=8,
            hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0, initializer_range=0.2, hidden_act="relu")

CONFIGS = {
    "all-lsh": dict(attn_layers=["lsh", "lsh"], num_buckets=4, num_hashes=2, is_decoder=True),
    "crime-and-punishment": dict(attn_layers=["local", "lsh"] * 3, num_buckets=[2, 4], num_hashes=1,
                                 is_decoder=True),
    "enwik8": dict(attn_layers=["local", "local", "lsh", "local"], num_buckets=4, num_hashes=4,
                   lsh_attn_chunk_length=16, local_attn_chunk_length=8, is_decoder=True,
                   hidden_act="gelu"),
    "encoder": dict(attn_layers=["local", "lsh"], num_buckets=4, num_hashes=2, is_decoder=False),
    "encoder-after-1": dict(attn_layers=["local", "lsh"], num_buckets=[2, 2], num_hashes=3,
                            is_decoder=False, lsh_num_chunks_after=1, local_num_chunks_after=1),
}


def hf_model(name):
    torch.manual_seed(0)
    cfg = transformers.ReformerConfig(**{**BASE, **CONFIGS[name]})
    cls = transformers.ReformerModelWithLMHead if cfg.is_decoder else transformers.ReformerForMaskedLM
    return cls(cfg).eval()


def assert_parity(name, hf, ours, ids, mask=None, tolerance=0.0):
    """transformers' logits and ours on ids: bit-identical unless a tolerance is given (the README's
    claim)."""
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert expected.std() > 0.1, "weights too small for a meaningful comparison"
    if mask is not None:
        expected, got = expected[mask.bool()], got[mask.bool()]
    diff = (expected - got).abs().max().item()
    print(f"max |diff| {name}: {diff:.2e}")
    assert diff <= tolerance


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("length", [64, 45])
def test_logits_match_transformers(name, length):
    hf = hf_model(name)
    ours = load_hf(hf)
    ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(3))
    assert_parity(f"{name} L={length}", hf, ours, ids)


@pytest.mark.parametrize("name,tolerance", [("all-lsh", 0.0), ("encoder", 1e-5)])
def test_length_equal_to_chunk_uses_transformers_full_attention_fallback(name, tolerance):
    """The encoder's one-chunk fallback rounds differently from transformers' (1.7e-6 here; the README
    says so); everything else is bit-identical."""
    hf = hf_model(name)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(4))
    assert_parity(f"{name} L=chunk", hf, load_hf(hf), ids, tolerance=tolerance)


@pytest.mark.parametrize("name", ["crime-and-punishment", "encoder"])
def test_padded_batch_with_attention_mask(name):
    hf = hf_model(name)
    ids = torch.randint(0, 64, (3, 48), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 9:] = 0
    assert_parity(f"{name} padded", hf, load_hf(hf), ids, mask)


def test_import_from_a_saved_folder_and_export_back(tmp_path):
    hf = hf_model("crime-and-punishment")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 64, (2, 40))
    assert_parity("crime-and-punishment from folder", hf, ours, ids)

    save_hf(ours, tmp_path / "back")
    reloaded = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "back").eval()
    assert_parity("crime-and-punishment exported", reloaded, ours, ids)

    again = load_hf(tmp_path / "back")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_encoder_exports_as_masked_lm(tmp_path):
    hf = hf_model("encoder")
    ours = load_hf(hf)
    save_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ReformerForMaskedLM"]
    reloaded = transformers.ReformerForMaskedLM.from_pretrained(tmp_path).eval()
    assert_parity("encoder exported", reloaded, ours, torch.randint(0, 64, (2, 33)))


def test_unmappable_fields_are_named(tmp_path):
    from reformer.interop.hf import config_from_hf

    good = transformers.ReformerConfig(**{**BASE, **CONFIGS["all-lsh"]}).to_dict()
    with pytest.raises(ValueError, match="num_buckets"):
        config_from_hf({**good, "num_buckets": None})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**good, "hidden_act": "mish"})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**good, "model_type": "bert"})
    with pytest.raises(ValueError, match="config.json is missing"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(good))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_hf(tmp_path)


def test_bucket_window_models_refuse_export(tmp_path):
    from helpers import tiny

    with pytest.raises(ValueError, match="lsh_window"):
        save_hf(ReformerLM(tiny()), tmp_path)


def test_import_from_pytorch_model_bin(tmp_path):
    hf = hf_model("enwik8")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ids = torch.randint(0, 64, (1, 50))
    assert_parity("enwik8 from pytorch_model.bin", hf, load_hf(tmp_path), ids)


def test_import_of_a_folder_holding_only_lm_head_bias(tmp_path):
    """transformers 4.x saves the tied LM bias once, as lm_head.bias (not lm_head.decoder.bias)."""
    from safetensors.torch import save_file

    hf = hf_model("all-lsh")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.decoder.bias"}
    assert "lm_head.bias" in state
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_parity("lm_head.bias only", hf, load_hf(tmp_path), torch.randint(0, 64, (2, 24)))


def test_an_all_local_model_may_leave_the_lsh_band_unset():
    from reformer.interop.hf import config_from_hf

    good = transformers.ReformerConfig(**{**BASE, "attn_layers": ["local", "local"], "is_decoder": True}).to_dict()
    config = config_from_hf({**good, "lsh_num_chunks_before": None, "lsh_num_chunks_after": None})
    assert config.attn_layers == ("local", "local")
    with pytest.raises(ValueError, match="lsh_num_chunks_before"):
        config_from_hf({**transformers.ReformerConfig(**{**BASE, **CONFIGS["all-lsh"]}).to_dict(),
                        "lsh_num_chunks_before": None})


def test_export_of_a_chunked_feed_forward_runs_at_any_length(tmp_path):
    """Our feed-forward chunks take any length; transformers' demand a multiple, so the export runs whole."""
    hf = hf_model("all-lsh")
    ours = load_hf(hf)
    chunked = ReformerLM(ours.config.__class__(**{**ours.config.to_dict(), "ff_chunk_size": 16}))
    chunked.load_state_dict(ours.state_dict())
    save_hf(chunked.eval(), tmp_path)
    reloaded = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path).eval()
    assert_parity("chunked feed-forward exported, L=40", reloaded, chunked, torch.randint(0, 64, (2, 40)))
