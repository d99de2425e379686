"""Cached decoding equals the full forward pass; sampling behaves."""

import pytest
import torch

from helpers import tiny
from reformer import ReformerLM
from reformer.generate import Decoder, generate, sample

MODELS = {
    "lsh": dict(attn_layers="lsh", n_layers=2, n_hashes=4),
    "local": dict(attn_layers="local", n_layers=2),
    "full": dict(attn_layers="full", n_layers=2),
    "mixed": dict(attn_layers=("local", "lsh", "full", "lsh"), n_layers=4, n_hashes=2, n_buckets=(2, 4)),
    "few-buckets": dict(attn_layers="lsh", n_layers=2, n_hashes=3, n_buckets=2),   # buckets overflow W
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("prompt", [5, 40])
def test_cached_logits_equal_full_forward_at_every_step(name, prompt, core):
    """On either core: the compiled one decodes LSH and local layers by decode.c's steps, and runs the full
    forward at a length off the chunks (no padding mask in a causal bucket-window model)."""
    torch.manual_seed(0)
    model = ReformerLM(tiny(init_std=0.2, attention_backend=core, **MODELS[name])).eval()
    ids = torch.randint(0, 64, (2, 70))
    with torch.no_grad():
        full = model(ids)
    decoder = Decoder(model)
    steps = [decoder.prefill(ids[:, :prompt])]
    compiled_steps = {cache.native is not None for cache in decoder.caches if hasattr(cache, "native")}
    assert compiled_steps == (set() if name == "full" else {core == "native"})
    for t in range(prompt, ids.shape[1]):
        steps.append(decoder.step(ids[:, t]))
    cached = torch.stack(steps, dim=1)           # logits for positions prompt-1 ... 69
    diff = (cached - full[:, prompt - 1:]).abs().max().item()
    assert full.std() > 0.05
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_compiled_decode_steps_equal_the_eager_ones(name, dtype, tolerance, core):
    """decode.c's steps against the eager ones they replace, from a one-token prompt (queries with no
    earlier member of their bucket) past the caches' first growth: the logits, and the rings, counts and
    cached rows they leave."""
    if core != "native":
        pytest.skip("compares the compiled steps with the eager ones")
    torch.manual_seed(0)
    model = ReformerLM(tiny(init_std=0.2, **MODELS[name])).eval().to(dtype)
    ids = torch.randint(0, 64, (2, 90))
    compiled, eager = Decoder(model), Decoder(model)
    for cache in eager.caches:
        cache.backend = "eager"
    with torch.no_grad():
        pairs = [(compiled.prefill(ids[:, :1]), eager.prefill(ids[:, :1]))]
        pairs += [(compiled.step(ids[:, t]), eager.step(ids[:, t])) for t in range(1, ids.shape[1])]
    assert all(cache.native is None for cache in eager.caches if hasattr(cache, "native"))
    assert max((a - b).abs().max().item() for a, b in pairs) <= tolerance
    for ours, theirs in zip(compiled.caches, eager.caches, strict=True):
        assert torch.allclose(ours.key_values.view(), theirs.key_values.view(), rtol=0, atol=tolerance)
        if hasattr(ours, "ring"):
            assert ours.native is not None
            assert torch.equal(ours.ring, theirs.ring) and torch.equal(ours.count, theirs.count)
    if name != "full":
        with pytest.raises(ValueError, match="filled for 2 rows"):
            compiled.step(ids[:1, 0])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.bfloat16, 0.25)])
def test_cached_decoding_in_the_models_dtype(dtype, tolerance):
    """The decoder's fused weights and hashing follow the model's dtype (rotations are drawn in float32)."""
    torch.manual_seed(0)
    model = ReformerLM(tiny(init_std=0.2, **MODELS["mixed"])).eval().to(dtype)
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        full = model(ids)
    decoder = Decoder(model)
    steps = [decoder.prefill(ids[:, :20])] + [decoder.step(ids[:, t]) for t in range(20, 40)]
    cached = torch.stack(steps, dim=1)
    assert cached.dtype == dtype
    assert (cached - full[:, 19:]).abs().max().item() <= tolerance


def test_decoder_refuses_models_it_cannot_cache_exactly():
    with pytest.raises(ValueError, match="bucket"):
        Decoder(ReformerLM(tiny(lsh_window="chunk")))
    with pytest.raises(ValueError, match="causal"):
        Decoder(ReformerLM(tiny(causal=False)))


@pytest.mark.parametrize("window", ["bucket", "chunk"])
def test_generate_is_seeded_and_cached_matches_uncached(window):
    torch.manual_seed(0)
    model = ReformerLM(tiny(init_std=0.2, lsh_window=window)).eval()
    kwargs = dict(max_new_tokens=30, temperature=1.0, top_k=20, seed=3)
    first = generate(model, [1, 2, 3], **kwargs)
    assert first == generate(model, [1, 2, 3], **kwargs)
    assert first == generate(model, [1, 2, 3], use_cache=False, **kwargs)
    assert first != generate(model, [1, 2, 3], **{**kwargs, "seed": 4})
    assert len(first) == 30


def test_generation_stops_at_stop_tokens_and_at_max_seq_len():
    torch.manual_seed(0)
    model = ReformerLM(tiny(max_seq_len=32, axial_shape=(4, 8))).eval()
    greedy = generate(model, [5], max_new_tokens=20, temperature=0)
    out = generate(model, [5], max_new_tokens=20, temperature=0, stop=[greedy[3]])
    assert out == greedy[:greedy.index(greedy[3]) + 1]
    assert len(generate(model, [5] * 30, max_new_tokens=10)) == 2
    streamed = []
    generate(model, [5], max_new_tokens=4, temperature=0, on_token=streamed.append)
    assert streamed == greedy[:4]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, g, temperature=0).item() == 3
    draws = {sample(logits, g, top_k=2).item() for _ in range(50)}
    assert draws <= {2, 3} and len(draws) == 2
    # top-p 0.6: the most likely token (p=0.64) alone reaches it
    assert {sample(logits, g, top_p=0.6).item() for _ in range(20)} == {3}


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p")])
def test_bad_sampling_arguments(kwargs, message):
    model = ReformerLM(tiny())
    with pytest.raises(ValueError, match=message):
        generate(model, [1], max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="causal"):
        generate(ReformerLM(tiny(causal=False)), [1], max_new_tokens=2)


def test_repetition_penalty_lowers_the_logits_of_recent_tokens():
    from reformer.generate import penalise_repeats

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = penalise_repeats(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]          # positive halved, negative doubled, others kept
    assert torch.equal(penalise_repeats(logits, torch.tensor([[0]]), 1.0), logits)


def test_a_repetition_penalty_breaks_a_loop_on_one_byte():
    """A model whose likeliest byte is always 5 (as a short-trained byte model's is the space)."""
    torch.manual_seed(0)
    model = ReformerLM(tiny(vocab_size=64, max_seq_len=256)).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(0.0)
        model.head.bias[5], model.head.bias[7] = 10.0, 9.0
    assert set(generate(model, [1, 2, 3], 12, temperature=0)) == {5}
    penalised = generate(model, [1, 2, 3], 12, temperature=0, repetition_penalty=2.0, penalty_window=4)
    assert penalised[:3] == [5, 7, 5] and 7 in penalised[3:]
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, [1], 2, repetition_penalty=0.5)


@pytest.mark.parametrize("name", ["lsh", "mixed"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_batch_of_prompts_of_different_lengths_decodes_as_each_alone(name, temperature):
    from reformer.generate import generate_batch

    torch.manual_seed(0)
    model = ReformerLM(tiny(init_std=0.2, **MODELS[name])).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    batched = generate_batch(model, prompts, 12, temperature=temperature, seed=5, stop=[63])
    alone = [generate(model, p, 12, temperature=temperature, seed=5 + i, stop=[63]) for i, p in enumerate(prompts)]
    assert batched == alone
    assert all(1 <= len(new) <= 12 for new in batched)


def test_batched_generation_checks_its_prompts():
    from reformer.generate import generate_batch

    model = ReformerLM(tiny()).eval()
    for prompts, message in (([], "non-empty"), ([[1], []], "non-empty"), ([[1, 99]], "vocab_size"),
                             ([[1] * 256], "shorter than max_seq_len")):
        with pytest.raises(ValueError, match=message):
            generate_batch(model, prompts, 4)
    with pytest.raises(ValueError, match="top_p"):
        generate_batch(model, [[1]], 4, top_p=0.0)
