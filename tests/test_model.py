"""ReformerLM end to end: strict causality, padding, reversible gradients, determinism."""

import pytest
import torch

from helpers import tiny
from reformer import ReformerLM

CAUSAL_MODELS = {
    "lsh": dict(attn_layers="lsh", n_layers=3, n_hashes=4),
    "mixed": dict(attn_layers=("lsh", "local", "full", "lsh"), n_layers=4, n_hashes=2),
    "factorised": dict(attn_layers="lsh", n_layers=2, n_hashes=3, n_buckets=(4, 8)),
}


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return ReformerLM(tiny(**overrides)).eval()


@pytest.mark.parametrize("name", sorted(CAUSAL_MODELS))
@pytest.mark.parametrize("length", [37, 61, 700])
def test_later_tokens_never_change_earlier_logits(name, length, core):
    """Bit for bit, on every core: an earlier output never depends on a later token."""
    model = build(**CAUSAL_MODELS[name], attention_backend="auto" if core == "native" else core,
                  max_seq_len=1024)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, length), generator=gen)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 17, length - 2):
            changed = x.clone()
            changed[:, t + 1:] = torch.randint(0, 64, changed[:, t + 1:].shape, generator=gen)
            diff = (model(changed)[:, :t + 1] - base[:, :t + 1]).abs().max().item()
            assert diff == 0.0, f"position <= {t} changed by {diff}"
            # Prefix stability: the model run on x[:t+1] alone agrees too.
            prefix = (model(x[:, :t + 1]) - base[:, :t + 1]).abs().max().item()
            # Not bit for bit: a shorter input is a product with fewer rows, which BLAS computes with other
            # kernels (one row: a matrix-vector product) that round differently, in every layer alike.
            assert prefix <= 1e-6, f"prefix of length {t + 1} differs by {prefix}"


def test_anchor_chunk_window_leaks_future_tokens():
    """The anchors' semantics (lsh_window='chunk') are not causal: why 'bucket' is the default."""
    model = build(attn_layers="lsh", n_layers=2, n_hashes=2, lsh_window="chunk")
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (1, 64), generator=gen)
    changed = x.clone()
    changed[:, 33:] = torch.randint(0, 64, (1, 31), generator=gen)
    with torch.no_grad():
        diff = (model(changed)[:, :33] - model(x)[:, :33]).abs().amax(dim=-1)
    assert (diff > 1e-4).sum() > 5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layers", ["lsh", ("lsh", "local", "full")])
def test_sequence_in_padded_batch_equals_sequence_alone(causal, layers):
    lengths = [1, 2, 9, 17, 100]
    model = build(attn_layers=layers, n_layers=1 if layers == "lsh" else 3, n_hashes=3, causal=causal)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 64, (n,), generator=gen) for n in lengths]
    batch = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, s in enumerate(seqs):
        batch[i, :len(s)], mask[i, :len(s)] = s, 1
        batch[i, len(s):] = torch.randint(0, 64, (max(lengths) - len(s),), generator=gen)  # junk
    with torch.no_grad():
        logits = model(batch, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = model(s[None])
            torch.testing.assert_close(logits[i, :len(s)], alone[0], atol=1e-5, rtol=0)


def test_encoder_sees_both_directions():
    model = build(causal=False, init_std=0.3)
    x = torch.randint(0, 64, (1, 40))
    changed = x.clone()
    changed[0, 30] = (x[0, 30] + 1) % 64
    with torch.no_grad():
        assert (model(changed)[0, :30] - model(x)[0, :30]).abs().max() > 1e-4


def gradients(model, x, seed):
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "hash_calls"):
            m.hash_calls.fill_(0)
    model.zero_grad()
    loss = model.loss(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layers,ff_chunk", [("lsh", 0), (("lsh", "local", "full"), 0), ("lsh", 16)])
def test_reversible_gradients_equal_plain_autograd(layers, ff_chunk):
    """With ff_chunk, reversible backward re-runs the feed-forward a chunk at a time (45 = 16 + 16 + 13),
    drawing the same dropout masks as the forward did."""
    cfg = dict(attn_layers=layers, n_layers=3, n_hashes=2, dropout=0.1, attention_dropout=0.1,
               ff_chunk_size=ff_chunk)
    torch.manual_seed(0)
    reversible = ReformerLM(tiny(reversible=True, **cfg)).double().train()
    plain = ReformerLM(tiny(reversible=False, **cfg)).double().train()
    plain.load_state_dict(reversible.state_dict())
    x = torch.randint(0, 64, (2, 45))
    loss_r, grads_r = gradients(reversible, x, seed=5)
    loss_p, grads_p = gradients(plain, x, seed=5)
    assert torch.equal(loss_r, loss_p)
    for name, g in grads_p.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_r[name], g, rtol=1e-8, atol=1e-12, msg=name)


def test_reversible_backward_leaves_hash_counters_and_rng_as_forward_left_them():
    model = build(n_hashes=2, dropout=0.1).train()
    x = torch.randint(0, 64, (1, 30))
    loss = model.loss(x)
    calls = [int(m.hash_calls) for m in model.modules() if hasattr(m, "hash_calls")]
    state = torch.get_rng_state()
    loss.backward()
    assert [int(m.hash_calls) for m in model.modules() if hasattr(m, "hash_calls")] == calls
    assert torch.equal(torch.get_rng_state(), state)


def train_losses(seed, steps=4):
    torch.manual_seed(seed)
    model = ReformerLM(tiny(n_layers=2, dropout=0.1, attention_dropout=0.1)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 50))
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_from_a_seed_is_bit_identical():
    first, second = train_losses(3), train_losses(3)
    assert first == second
    assert train_losses(4) != first


@pytest.mark.parametrize("training", [True, False])
def test_hashing_leaves_the_global_rng_alone(training):
    model = build(n_hashes=4).train(training)
    x = torch.randint(0, 64, (2, 40))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model(x)
    assert torch.equal(torch.get_rng_state(), before)


def test_training_hashes_afresh_and_eval_hashes_deterministically():
    model = build(n_hashes=1, n_layers=1)
    x = torch.randint(0, 64, (1, 64))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def saved_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x)
    loss.backward()
    return total


def test_reversible_activation_memory_is_flat_in_depth():
    x = torch.randint(0, 64, (1, 256))
    sizes = {}
    for reversible in (True, False):
        for depth in (2, 12):
            torch.manual_seed(0)
            model = ReformerLM(tiny(n_layers=depth, reversible=reversible)).train()
            sizes[reversible, depth] = saved_bytes(model, x)
    assert sizes[True, 12] <= 1.25 * sizes[True, 2]
    assert sizes[False, 12] > 4 * sizes[False, 2]   # the check can fail: plain autograd grows


def test_n_hashes_override_changes_rounds():
    model = build(n_hashes=2)
    x = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        assert not torch.equal(model(x, n_hashes=1), model(x, n_hashes=8))
        assert torch.equal(model(x, n_hashes=2), model(x))


def test_axial_embeddings_work_below_the_axial_product():
    model = build(max_seq_len=256, axial_shape=(16, 16))
    for length in (1, 7, 100, 256):
        assert model(torch.randint(0, 64, (1, length))).shape == (1, length, 64)


@pytest.mark.parametrize("embedding", ["learned", "none"])
def test_other_position_embeddings(embedding):
    model = build(position_embedding=embedding)
    logits = model(torch.randint(0, 64, (2, 19)))
    assert logits.shape == (2, 19, 64) and logits.isfinite().all()


def test_chunked_feed_forward_equals_unchunked():
    whole = build(ff_chunk_size=0)
    chunked = build(ff_chunk_size=7)
    x = torch.randint(0, 64, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), whole(x), atol=1e-6, rtol=0)


def test_masked_lm_loss_needs_labels_and_ignores_minus_100():
    model = build(causal=False)
    x = torch.randint(0, 64, (2, 20))
    with pytest.raises(ValueError, match="labels"):
        model.loss(x)
    labels = torch.full_like(x, -100)
    labels[:, 3] = x[:, 3]
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, 3], x[:, 3])
    torch.testing.assert_close(model.loss(x, labels=labels), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_head_loss_equals_whole_head_in_value_and_gradients(causal):
    """head_chunk_size computes the head and loss in pieces (no length x vocab logits); the loss and every
    gradient must equal the whole head's, with a padding mask and a chunk that does not divide the length."""
    torch.manual_seed(0)
    whole = build(causal=causal, dropout=0.0)
    chunked = build(causal=causal, dropout=0.0, head_chunk_size=7)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randint(0, 64, (2, 50))
    mask = torch.ones_like(x)
    mask[1, 41:] = 0
    labels = None if causal else torch.where(torch.rand(x.shape) < 0.3, x, -100)
    losses = []
    for model in (whole, chunked):
        loss = model.loss(x, attention_mask=mask, labels=labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    # Without gradients (evaluation) the chunks give the same value.
    with torch.no_grad():
        torch.testing.assert_close(chunked.loss(x, attention_mask=mask, labels=labels), losses[0].detach(),
                                   atol=1e-6, rtol=1e-6)


def test_forward_with_labels_is_the_loss():
    """model(ids, labels=ids) is model.loss(ids): the training loop calls it through DDP's forward."""
    model = build(head_chunk_size=16)
    x = torch.randint(0, 64, (2, 40))
    torch.testing.assert_close(model(x, labels=x), model.loss(x))
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :5])


def test_backward_leaves_the_hidden_states_it_returned_alone():
    """The stack's backward rebuilds its blocks in the memory of its outputs only where the model keeps them
    private (loss, logits); halves handed to the caller by hidden_states stay as they were."""
    model = build(n_layers=2).train()
    x = torch.randint(0, 64, (2, 48))
    y1, y2 = model.hidden_states(x)
    before = y1.detach().clone(), y2.detach().clone()
    grad = torch.randn_like(y1)
    grad_before = grad.clone()
    torch.autograd.backward([y1, y2], [grad, grad])
    assert torch.equal(y1.detach(), before[0]) and torch.equal(y2.detach(), before[1])
    assert torch.equal(grad, grad_before) and all(p.grad is not None for p in model.stack.parameters())
