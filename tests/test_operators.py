"""The attention cores as torch operators: opcheck for each, torch.compile of a training step with no graph
break and the eager step's numbers, and the FlexAttention backend against the eager core (forward on the
CPU; training on CUDA where there is one)."""

import pytest
import torch
from torch.library import opcheck

from helpers import tiny
from reformer import ReformerConfig, ReformerLM
from reformer.ops import flex, hashing
from reformer.ops.backend import available_backends
from reformer.ops.bucket_attention import split_pairs

needs_native = pytest.mark.skipif("native" not in available_backends(), reason="no C compiler builds the "
                                  "compiled interval core here")
needs_flex = pytest.mark.skipif("flex" not in available_backends(), reason="this torch has no FlexAttention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _native_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    batch, length, d_model, heads, d = 2, 64, 16, 2, 8
    h = torch.randn(batch, length, d_model, generator=g, dtype=dtype, requires_grad=True)
    w_qk, w_v = (torch.randn(heads * d, d_model, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    rotations = hashing.draw_rotations(0, heads, d, 2, 4).to(dtype)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 50:] = False
    return h, w_qk, w_v, rotations, valid


@needs_native
def test_every_compiled_core_operator_passes_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of reformer::project_pairs,
    hash_buckets, lsh_bucket_attention (with and without padding, causal and not) and local_attention."""
    from reformer.ops.native import ops

    h, w_qk, w_v, rotations, valid = _native_case()
    rows = ops.project_pairs(h.detach(), w_qk.detach(), w_v.detach(), 2)
    qk, v = split_pairs(rows, 2)
    cases = [(ops.project_pairs, (h.detach(), w_qk.detach(), w_v.detach(), 2)),
             (ops.hash_buckets, (qk, rotations, [4])), (ops.hash_buckets, (qk, rotations.repeat(1, 1, 1, 2), [4, 4]))]
    for key_valid, after, causal in ((None, 0, True), (valid, 1, False)):
        buckets = hashing.with_padding(ops.hash_buckets(qk, rotations, [4]), 4, key_valid)
        cases.append((ops.lsh_bucket_attention, (h, w_qk, w_v, qk, v, buckets, key_valid, 8, 1, after, causal)))
    q, k, v = (torch.randn(2, 2, 64, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cases += [(ops.local_attention, (q, k, v, 8, 1, 0, True)), (ops.local_attention, (q, k, v, 8, 1, 1, False))]
    for op, args in cases:
        assert set(opcheck(op, args).values()) == {"SUCCESS"}, op


def test_the_rotations_and_the_reversible_stack_pass_opcheck():
    """The rotations' draw (training and evaluation) and the reversible stack (in evaluation: in training
    every call draws new rotations, as it must, so no two calls agree)."""
    from reformer.nn import reversible

    for calls in (torch.tensor(3), None):
        args = (calls, 0, 1, 2, 8, 2, 2, torch.device("cpu"))
        assert set(opcheck(hashing.lsh_rotations, args).values()) == {"SUCCESS"}
    model = ReformerLM(ReformerConfig.preset("tiny")).double().eval()
    x1, x2 = (torch.randn(2, 64, 32, dtype=torch.float64, requires_grad=True) for _ in range(2))
    stack = model.stack
    args = (x1, x2, None, stack.trained_parameters(), stack.number(), None, False, torch.bfloat16, False)
    assert set(opcheck(reversible.reversible_forward, args).values()) == {"SUCCESS"}


def _reset(model):
    for m in model.modules():
        if hasattr(m, "hash_calls"):
            m.hash_calls.fill_(0)
    model.zero_grad()


@pytest.mark.parametrize("reversible", [True, False])
def test_a_training_step_compiles_into_one_graph(reversible):
    """torch._dynamo.explain of model.loss in train mode on the default preset: one graph, no break."""
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.preset("small", reversible=reversible)).train()
    explanation = torch._dynamo.explain(model.loss)(torch.randint(0, 256, (2, 256)))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("preset,overrides", [("small", {}), ("tiny", dict(reversible=False, dropout=0.1,
                                                                            attn_layers=("lsh", "full")))])
def test_a_compiled_training_step_equals_the_eager_one(preset, overrides):
    """torch.compile(model.loss, fullgraph=True) with inductor, forward and backward: loss within 1e-5,
    every gradient within 1e-4 relative; the LSH layers' call counters advance as in eager mode. (Dropout
    inside the graph draws from inductor's generator unless fallback_random makes it eager's.)"""
    from torch._inductor import config as inductor_config

    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.preset(preset, **overrides)).train()
    ids = torch.randint(0, 256, (2, 256))

    def step(loss_of):
        _reset(model)
        torch.manual_seed(1)
        loss = loss_of(ids)
        loss.backward()
        calls = [int(m.hash_calls) for m in model.modules() if hasattr(m, "hash_calls")]
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls

    eager_loss, eager_grads, eager_calls = step(model.loss)
    with inductor_config.patch(fallback_random=True):
        compiled_loss, compiled_grads, compiled_calls = step(torch.compile(model.loss, fullgraph=True))
    assert abs(compiled_loss - eager_loss).item() <= 1e-5
    assert compiled_calls == eager_calls == [1] * len(eager_calls)
    for name, want in eager_grads.items():
        error = (compiled_grads[name] - want).norm() / want.norm().clamp_min(1e-30)
        assert error <= 1e-4, (name, error.item())


FLEX_CASES = {
    "lsh-1-round": dict(attn_layers=("lsh", "local"), n_hashes=1),
    "lsh-3-rounds": dict(attn_layers=("lsh", "local"), n_hashes=3),
    "factorised": dict(attn_layers="lsh", n_buckets=(4, 2), n_hashes=2),
    "encoder": dict(attn_layers=("local", "lsh"), causal=False, n_hashes=2),
    "local-encoder": dict(attn_layers="local", causal=False),
    "blocks": dict(attn_layers=("lsh", "local"), chunk_length=64, n_chunks_before=2, local_chunk_length=48,
                   max_seq_len=512),
}


@needs_flex
@pytest.mark.parametrize("name", sorted(FLEX_CASES))
@pytest.mark.parametrize("length,padded", [(67, False), (100, True), (300, True)])
def test_the_flex_backend_equals_the_eager_one(name, length, padded, monkeypatch):
    """Logits of the whole model within 1e-5, padding included; odd lengths; sequences of several of
    FlexAttention's 128-row blocks and bands that reach across them ("blocks")."""
    calls = []
    original = flex._attend
    monkeypatch.setattr(flex, "_attend", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    cfg = dict(FLEX_CASES[name])
    cfg.setdefault("max_seq_len", 512)
    eager = ReformerLM(tiny(**cfg, attention_backend="eager")).eval()
    flexed = ReformerLM(tiny(**cfg, attention_backend="flex")).eval()
    flexed.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 64, (2, length))
    mask = None
    if padded:
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, length * 2 // 3:] = False
    with torch.no_grad():
        want, got = eager(ids, attention_mask=mask), flexed(ids, attention_mask=mask)
    assert calls, "the flex core did not run"
    assert (got - want).abs().max().item() <= 1e-5


@needs_flex
def test_the_flex_backend_refuses_to_train_on_the_cpu():
    model = ReformerLM(tiny(attention_backend="flex")).train()
    with pytest.raises(ValueError, match="'flex' needs evaluation on the CPU"):
        model.loss(torch.randint(0, 64, (2, 40)))


@needs_cuda
@needs_flex
def test_flex_training_on_cuda_equals_the_eager_core():
    """bfloat16 autocast training step on CUDA through compiled FlexAttention, against the eager core in
    float32: the loss within 2e-2, and gradients that point the same way."""
    torch.manual_seed(0)
    cfg = dict(attn_layers=("local", "lsh"), n_hashes=2, max_seq_len=1024)
    eager = ReformerLM(tiny(**cfg, attention_backend="eager")).cuda().train()
    flexed = ReformerLM(tiny(**cfg, attention_backend="flex")).cuda().train()
    flexed.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 64, (2, 1000), device="cuda")
    losses, grads = [], []
    for model, autocast in ((eager, False), (flexed, True)):
        _reset(model)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(ids)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) <= 2e-2
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
