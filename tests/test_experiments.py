"""``reformer experiment NAME --quick``: every experiment runs from the command line and writes a sane report."""

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import full_shared_qk_attention
from reformer import LSHSelfAttention, ReformerConfig, ReformerLM
from reformer.experiments import lm_parity
from reformer.experiments.duplication import DuplicationSettings, duplication_batch, model_config, with_attention
from reformer.experiments.long_range import LongRangeSettings
from reformer.experiments.report import full_attention_overrides, same_weights


def run_quick(name, tmp_path):
    out = tmp_path / name
    result = subprocess.run([sys.executable, "-m", "reformer", "experiment", name, "--quick", "--out", str(out)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["written"] == str(out)
    record = json.loads((out / "results.json").read_text())
    readme = (out / "README.md").read_text()
    assert record["experiment"] == name and record["quick"] is True and record["seed"] == 0
    assert record["wall_seconds"] > 0 and record["machine"]["torch"] == torch.__version__
    assert f"experiment {name} --quick" in record["command"] and record["command"] in readme
    return out, record["results"], readme


@pytest.mark.slow
def test_duplication_quick_learns_the_copy_and_fills_the_table(tmp_path):
    out, results, readme = run_quick("duplication", tmp_path)
    accuracy = results["accuracy"]
    assert set(accuracy) == {"Full", "LSH-2"}
    for row in accuracy.values():
        assert set(row) == {"Full", "LSH-4", "LSH-1"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    chance = 1 / 127
    # Far above chance: the models learned to look half a sequence back; more rounds find it more often.
    assert accuracy["Full"]["Full"] > 0.9 and accuracy["LSH-2"]["LSH-4"] > 0.9 > 50 * chance
    assert accuracy["LSH-2"]["LSH-4"] >= accuracy["LSH-2"]["LSH-1"]
    assert "| LSH-2 |" in readme and (out / "training.png").stat().st_size > 0


@pytest.mark.slow
def test_lm_parity_quick_trains_every_variant(tmp_path):
    out, results, readme = run_quick("lm-parity", tmp_path)
    variants = {"full", "lsh-2", "lsh-4-chunk", "local", "lsh-4-plain"}
    assert set(results["final_bpb"]) == variants == set(results["curves"])
    for name, bpb in results["final_bpb"].items():
        assert math.isfinite(bpb) and 3.0 < bpb < 8.0, (name, bpb)   # below uniform (8 bits/byte)
        assert [point[0] for point in results["curves"][name]] == [10, 20]
        assert f"| {name} |" in readme
    assert (out / "curves.png").stat().st_size > 0
    assert all((out / "runs" / v / "model.safetensors").exists() for v in variants)
    # A finished run is reused (by a rerun, and by hash-rounds) only when its settings and seed match.
    assert lm_parity.finished(out / "runs" / "lsh-2", lm_parity.QUICK, "lsh-2", seed=0)
    assert not lm_parity.finished(out / "runs" / "lsh-2", lm_parity.QUICK, "lsh-2", seed=1)
    assert not lm_parity.finished(out / "runs" / "full", lm_parity.QUICK, "lsh-2", seed=0)
    before = (out / "runs" / "lsh-2" / "metrics.jsonl").read_text()
    records = lm_parity.train_variant(lm_parity.QUICK, "lsh-2", out / "runs" / "lsh-2", 0, progress=False)
    assert [r for r in records if "valid_bpb" in r] == [r for r in map(json.loads, before.splitlines())
                                                        if "valid_bpb" in r]


@pytest.mark.slow
def test_hash_rounds_quick_evaluates_every_round_count(tmp_path):
    out, results, readme = run_quick("hash-rounds", tmp_path)
    assert set(results["bpb"]) == {"LSH-1", "LSH-2", "LSH-4", "LSH-8", "full"}
    assert all(math.isfinite(v) and v < 8.0 for v in results["bpb"].values())
    assert (out / "rounds.png").stat().st_size > 0 and "| full |" in readme


@pytest.mark.slow
def test_speed_quick_measures_every_point(tmp_path):
    out, results, readme = run_quick("speed", tmp_path)
    points = results["points"]
    modes = {("full", 1), ("ours", 1), ("ours", 2)}
    assert {(p["implementation"], p["n_hashes"]) for p in points} == modes
    assert {p["length"] for p in points} == {256, 1024}
    for p in points:
        assert "error" not in p, p
        assert p["batch"] * p["length"] == 1024 and p["seconds"] > 0 and p["peak_rss_mib"] > 0
    assert (out / "speed.png").stat().st_size > 0 and "| 1024 x 1 |" in readme


def test_duplication_batches_are_two_copies():
    batch = duplication_batch(5, 20, 7, torch.Generator().manual_seed(0))
    assert batch.shape == (5, 20)
    assert (batch[:, 0] == 0).all() and (batch[:, 10] == 0).all()
    assert torch.equal(batch[:, :10], batch[:, 10:])
    assert batch[:, 1:10].min() >= 1 and batch[:, 1:10].max() <= 7


def test_local_duplication_mode_cannot_see_the_first_copy():
    # The baseline of the duplication table: one bucket and the LSH chunk, so a position sees its own
    # chunk and the one before it. Rewriting the first copy must leave every logit from two chunks
    # past it unchanged, while full attention with the same weights does see the change.
    settings = DuplicationSettings(length=64, chunk_length=8, train_modes=("local",), eval_modes=("local", "full"),
                                   curriculum=())
    torch.manual_seed(0)
    model = ReformerLM(model_config(settings, "local")).eval()
    batch = duplication_batch(2, 64, 127, torch.Generator().manual_seed(0))
    changed = batch.clone()
    changed[:, 1:32] = torch.randint(1, 128, (2, 31), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        local = with_attention(model, settings, "local")
        full = with_attention(model, settings, "full")
        torch.testing.assert_close(local(changed)[:, 40:], local(batch)[:, 40:], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(full(changed)[:, 40:], full(batch)[:, 40:], atol=1e-3)


def test_a_report_names_the_cpu_and_the_vector_instructions_its_numbers_depend_on(tmp_path):
    """float32 training takes another path on another CPU: a result must say which one it ran on."""
    from reformer.experiments.report import Report

    record = Report("demo", tmp_path, seed=0, quick=True, settings={}).write({"x": 1}, "Demo", "body")
    capability = torch.backends.cpu.get_cpu_capability()
    assert record["machine"]["cpu_capability"] == capability and record["machine"]["cpu"]
    assert json.loads((tmp_path / "results.json").read_text())["machine"] == record["machine"]
    assert f"{record['machine']['cpu']} ({capability})" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("length", [50, 64])
def test_full_attention_overrides_make_lsh_layers_attend_to_every_earlier_position(length):
    torch.manual_seed(0)
    config = ReformerConfig(vocab_size=32, d_model=32, n_heads=2, d_head=16, n_layers=1, d_ff=32,
                            n_hashes=4, chunk_length=8, max_seq_len=64)
    model = ReformerLM(config).eval()
    full = same_weights(model, **full_attention_overrides(length))
    layer = next(m for m in full.modules() if isinstance(m, LSHSelfAttention))
    assert torch.equal(layer.qk.weight, next(m for m in model.modules()
                                             if isinstance(m, LSHSelfAttention)).qk.weight)
    x = torch.randn(2, length, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), full_shared_qk_attention(layer, x, causal=True),
                                   atol=1e-5, rtol=1e-5)


def test_a_childs_peak_memory_is_its_own_not_its_parents():
    """The benchmarks measure each point in a child process: its peak must not start at the parent's."""
    from reformer.experiments.speed import peak_rss_mib

    ballast = bytearray(600 << 20)
    memoryview(ballast)[::4096] = b"\1" * (len(ballast) // 4096)   # touch every page
    parent = peak_rss_mib()
    assert parent >= 600
    child = subprocess.run([sys.executable, "-c", "from reformer.experiments.speed import peak_rss_mib; "
                            "print(peak_rss_mib())"], capture_output=True, text=True, check=True)
    assert float(child.stdout) < parent - 300, (child.stdout, parent)
    del ballast


def test_recall_batches_hold_each_pair_once_and_query_it_at_the_end():
    """Every queried key's pair token occurs once in the context, at the stated distance back, and holds that
    key with the answer that follows the key in the query block; keys are distinct within a sequence."""
    from reformer.experiments.long_range import LongRangeSettings, pair_token, recall_batch

    settings = LongRangeSettings(train_length=512, eval_lengths=(512,), n_pairs=4, n_values=16, chunk_length=16)
    ids, query, answer, distance = recall_batch(6, 512, settings, torch.Generator().manual_seed(0))
    first_key, first_value = settings.n_filler, settings.n_filler + settings.n_keys
    for row in range(6):
        seq = ids[row].tolist()
        keys = [seq[q] for q in query[row].tolist()]
        assert len(set(keys)) == len(keys) and all(first_key <= k < first_value for k in keys)
        for q, a, d in zip(query[row].tolist(), answer[row].tolist(), distance[row].tolist(), strict=True):
            assert seq[q + 1] == a and first_value <= a < first_value + settings.n_values
            token = int(pair_token(settings, torch.tensor(seq[q] - first_key), torch.tensor(a - first_value)))
            assert [i for i, t in enumerate(seq) if t == token] == [q - d], (row, q)
    with pytest.raises(ValueError, match="fewer positions"):
        LongRangeSettings(train_length=32, eval_lengths=(32,), n_pairs=16, chunk_length=16)


@pytest.mark.slow
def test_long_range_quick_evaluates_every_mode_at_every_length(tmp_path):
    out, results, readme = run_quick("long-range", tmp_path)
    got = {(p["trained"], p["mode"], p["length"]) for p in results["points"]}
    assert got == {(t, m, n) for t, modes in (("Full", ("Full", "LSH-1", "LSH-2")), ("Local", ("Local",)))
                   for m in modes for n in (256, 1024)}
    for p in results["points"]:
        assert 0.0 <= p["accuracy"] <= 1.0 and len(p["pairs"]) == 8 * 16
        assert all(0 < d < p["length"] for d, _ in p["pairs"])   # every answer lies behind its query
    assert {s["mode"] for s in results["steps"]} == {"Full", "LSH-1", "LSH-2", "Local"}
    assert all("seconds" in s for s in results["steps"]), results["steps"]
    assert "| Full | LSH-2 |" in readme and (out / "distance.png").stat().st_size > 0


def test_context_scores_equal_the_training_loops_evaluation_and_bin_every_position(tmp_path):
    from reformer.experiments.context import QUICK_TRAINING, ContextSettings, binned, position_edges, score_windows
    from reformer.training.data import Corpus
    from reformer.training.loop import evaluate

    text = tmp_path / "text.txt"
    text.write_bytes(bytes(torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0)).tolist()))
    corpus = Corpus.open(str(text))
    model = ReformerLM(ReformerConfig(d_model=32, n_heads=2, d_head=16, n_layers=2, d_ff=64, chunk_length=16,
                                      attn_layers=("local", "lsh"), max_seq_len=256)).eval()
    settings = ContextSettings(training=QUICK_TRAINING, windows=(64, 256), eval_bytes=768, eval_batch=2)
    for window in (64, 256):
        got = score_windows(model, corpus.split("valid"), window, settings)
        assert got["windows"] == 768 // window and len(got["by_context"]) == window - 1
        assert got["bpb"] == pytest.approx(sum(got["by_context"]) / (window - 1), rel=1e-9)
        reference = evaluate(model, corpus, "valid", window, got["windows"], 1, torch.device("cpu"))
        assert got["bpb"] == pytest.approx(reference["bpb"], rel=1e-5)
    with pytest.raises(ValueError, match="eval_bytes"):   # the valid split holds 1,000 bytes
        score_windows(model, corpus.split("valid"), 64, ContextSettings(training=QUICK_TRAINING, windows=(64,),
                                                                        eval_bytes=4096))
    assert position_edges(8192) == [1, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert position_edges(100) == [1, 32, 64, 100]
    assert binned([1.0, 2.0, 3.0, 5.0], [1, 2, 5]) == [1.0, pytest.approx(10 / 3)]


def test_context_settings_reject_windows_longer_than_training():
    from reformer.experiments.context import ContextSettings

    with pytest.raises(ValueError, match="windows must be ints"):
        ContextSettings(training=lm_parity.QUICK, windows=(64, 4096))
    with pytest.raises(ValueError, match="eval_bytes"):
        ContextSettings(training=lm_parity.QUICK, windows=(128,), eval_bytes=100)


@pytest.mark.slow
def test_context_quick_scores_every_model_at_every_window(tmp_path):
    out, results, readme = run_quick("context", tmp_path)
    got = {(s["model"], s["rounds"], s["window"]) for s in results["scores"]}
    assert got == {("lsh-2", 2, 128), ("lsh-2", 2, 512), ("lsh-2", 4, 512), ("local", None, 128),
                   ("local", None, 512)}
    for s in results["scores"]:
        assert len(s["by_context"]) == s["window"] - 1 and all(math.isfinite(b) for b in s["by_context"])
        assert 0 < s["bpb"] < 8.5
    assert results["local_reach"] == 2 * (2 * 16 - 1)
    assert "| local |" in readme and "| lsh-2 (evaluated with 2 rounds) minus local |" in readme
    assert (out / "position.png").stat().st_size > 0


@pytest.mark.parametrize("make, field", [
    (lambda: DuplicationSettings(steps=0), "steps"),
    (lambda: DuplicationSettings(batch_size=2.0), "batch_size"),
    (lambda: LongRangeSettings(d_model=True), "d_model"),
])
def test_experiment_settings_name_the_field_that_is_not_a_positive_int(make, field):
    with pytest.raises(ValueError, match=f"{field} must be a positive int"):
        make()


def test_curriculum_stages_must_fit_the_model():
    with pytest.raises(ValueError, match="curriculum"):
        DuplicationSettings(length=512, curriculum=((1024, 10),))
    with pytest.raises(ValueError, match="curriculum"):
        DuplicationSettings(curriculum=((256, 0),))
    with pytest.raises(ValueError, match="curriculum.*room for the pairs"):
        LongRangeSettings(curriculum=((32, 10),))   # 16 pairs and their query block need 48 positions
    with pytest.raises(ValueError, match="curriculum.*at most train_length"):
        LongRangeSettings(curriculum=((512, 10),))
    with pytest.raises(ValueError, match="curriculum"):
        LongRangeSettings(curriculum=((72, 10),))   # not a multiple of the chunk


def test_curriculum_stages_carry_the_weights_and_moments_to_a_rebuilt_model():
    """A stage whose model_at builds a new model (as long-range does, to size the attention for the length)
    trains exactly as one that keeps the model: weights and Adam's moments carry over."""
    from reformer.experiments.curriculum import train_stages
    from reformer.nn.head import next_token_loss

    config = ReformerConfig(vocab_size=11, d_model=16, n_heads=2, d_head=8, n_layers=2, d_ff=32,
                            attn_layers=("local", "lsh"), chunk_length=8, n_hashes=2, max_seq_len=64)

    def batch_loss(model, length, n, generator):
        ids = torch.randint(0, 11, (n, length), generator=generator)
        logits = model(ids)
        return next_token_loss(logits, ids), (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()

    def keep(length, previous):
        return previous or ReformerLM(config).train()

    def rebuild(length, previous):
        model = ReformerLM(config).train()
        if previous is not None:
            model.load_state_dict(previous.state_dict())
        return model

    runs = [train_stages([(32, 3), (64, 3)], model_at, batch_loss, name="m", lr=1e-2, warmup=1, batch_size=2,
                         seed=5, log=lambda _: None) for model_at in (keep, rebuild)]
    (kept, kept_curve, _), (rebuilt, rebuilt_curve, _) = runs
    assert kept_curve == rebuilt_curve and len(kept_curve) == 6
    for name, weight in kept.state_dict().items():
        assert torch.equal(weight, rebuilt.state_dict()[name]), name
