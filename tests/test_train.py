"""Training: exact resume after kill -9, atomic checkpoints, DDP equivalence, clear errors."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_in_process
from reformer import ReformerConfig, ReformerLM
from reformer.training.checkpoint import CheckpointError, load_checkpoint, load_model, sha256_file
from reformer.training.data import Corpus, window_batch
from reformer.training.loop import TrainConfig, lr_factor, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """Real text: a few standard-library modules, concatenated."""
    import argparse
    import dataclasses as dc
    import json as js

    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (argparse, dc, js.decoder)))
    return path


def cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "reformer", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def small_run_args(data, run_dir, steps, **extra):
    args = ["train", "--data", data, "--run-dir", run_dir, "--preset", "tiny", "--steps", steps,
            "--batch-size", 4, "--seq-len", 128, "--eval-every", 1000, "--checkpoint-every", 4,
            "--dropout", 0.1, "--quiet"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def step_losses(run_dir):
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def test_checkpoint_write_is_atomic_under_failure(corpus_file, tmp_path, monkeypatch):
    cfg = TrainConfig(data=str(corpus_file), steps=4, batch_size=2, seq_len=32, checkpoint_every=2,
                      eval_every=100)
    model_cfg = ReformerConfig.preset("tiny")
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:        # the second checkpoint dies half-way through its state file
            f.write(b"partial")
            raise OSError("disk full (injected)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"step 4 .*injected.*previous checkpoint \(checkpoints/step-00000002\)"):
        train(tmp_path, model_cfg, cfg, progress=False)
    assert not list((tmp_path / "checkpoints").glob(".*")), "the failed checkpoint's folder is left behind"
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step-00000002"
    weights, state = load_checkpoint(tmp_path)
    assert state["step"] == 2
    load_model(tmp_path)                                     # model.safetensors is whole
    records = train(tmp_path, resume=True, progress=False)   # and the run resumes from it
    assert max(r["step"] for r in records) == 4


def test_damaged_checkpoint_files_give_clear_errors(corpus_file, tmp_path):
    train(tmp_path, ReformerConfig.preset("tiny"),
          TrainConfig(data=str(corpus_file), steps=2, batch_size=2, seq_len=32, checkpoint_every=2),
          progress=False)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)
    state = tmp_path / "checkpoints" / "step-00000002" / "state.pt"
    state.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(tmp_path)
    import argparse
    import pickle

    state.write_bytes(pickle.dumps(argparse.Namespace(step=1)))   # a pickle of something else
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(tmp_path)
    torch.save({"step": 2}, state)                                   # a torch file of something else
    with pytest.raises(CheckpointError, match="state.pt is corrupted"):
        load_checkpoint(tmp_path)
    sums = state.parent / "checksums.json"                           # ... even with a checksum that fits
    sums.write_text(json.dumps({**json.loads(sums.read_text()), "state.pt": sha256_file(state)}))
    with pytest.raises(CheckpointError, match="not a reformer training state"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a run folder"):
        load_model(tmp_path / "checkpoints")


def test_batches_depend_only_on_seed_and_step(corpus_file):
    data = Corpus.open(str(corpus_file)).split("train")
    a = window_batch(data, 4, 16, seed=1, step=7)
    assert torch.equal(a, window_batch(data, 4, 16, seed=1, step=7))
    assert not torch.equal(a, window_batch(data, 4, 16, seed=1, step=8))
    assert a.dtype == torch.int64 and a.shape == (4, 16)


def test_corpus_splits_are_fixed_and_disjoint(corpus_file):
    corpus = Corpus.open(str(corpus_file))
    size = corpus_file.stat().st_size
    assert corpus.bounds["train"] == (0, int(size * 0.9))
    assert corpus.bounds["valid"][0] == corpus.bounds["train"][1]
    assert corpus.bounds["test"][1] == size
    assert bytes(corpus.split("test")) == corpus_file.read_bytes()[corpus.bounds["test"][0]:]


def test_folder_and_enwik8_corpora(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"alpha " * 100)
    (folder / "sub" / "b.txt").write_bytes(b"beta " * 100)
    (folder / "c.bin").write_bytes(b"\x00" * 50)
    corpus = Corpus.open(str(folder), glob="**/*.txt")
    assert corpus.path.read_bytes() == b"alpha " * 100 + b"beta " * 100
    import zipfile

    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:
        z.writestr("enwik8", b"<page>" * 1000)
    corpus = Corpus.open(str(tmp_path / "enwik8.zip"))
    assert corpus.path.read_bytes() == b"<page>" * 1000


def test_learning_rate_schedules():
    cfg = TrainConfig(steps=100, warmup=10, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=0.01)
    assert lr_factor(39, TrainConfig(steps=100, warmup=10, schedule="rsqrt")) == pytest.approx(0.5)
    assert lr_factor(50, TrainConfig(steps=100, warmup=10, schedule="constant")) == 1.0


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop", "adafactor"])
def test_every_optimizer_trains(corpus_file, tmp_path, optimizer):
    if optimizer == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    lr = {"sgd": 0.5, "rmsprop": 3e-3}.get(optimizer, 1e-2)
    records = train(tmp_path, ReformerConfig.preset("tiny"),
                    TrainConfig(data=str(corpus_file), steps=12, batch_size=4, seq_len=64, lr=lr, warmup=2,
                                optimizer=optimizer, eval_every=100, checkpoint_every=100), progress=False)
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_gradient_accumulation_matches_one_big_batch(corpus_file, tmp_path):
    common = dict(data=str(corpus_file), steps=2, batch_size=4, seq_len=64, optimizer="sgd", momentum=0.0,
                  clip=0.0, eval_every=100, checkpoint_every=100)
    train(tmp_path / "a", ReformerConfig.preset("tiny"), TrainConfig(accum=1, **common), progress=False)
    train(tmp_path / "b", ReformerConfig.preset("tiny"), TrainConfig(accum=2, **common), progress=False)
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for torchrun's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_distributed_step_equals_single_process_step(corpus_file, tmp_path):
    """torchrun with 2 gloo processes == one process on the concatenated batch (reversible layers)."""
    lr = 0.5
    args = dict(optimizer="sgd", momentum=0.0, lr=lr, clip=0.0, warmup=0, dropout=0.0)
    single = cli(*small_run_args(corpus_file, tmp_path / "single", 1, **args))
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "reformer",
                          *map(str, small_run_args(corpus_file, tmp_path / "ddp", 1, **args))],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    torch.manual_seed(0)
    initial = ReformerLM(ReformerConfig.from_dict(json.loads((tmp_path / "single" / "config.json").read_text())))
    one, two = load_model(tmp_path / "single").state_dict(), load_model(tmp_path / "ddp").state_dict()
    for name, w0 in initial.state_dict().items():
        grad_single, grad_ddp = (w0 - one[name]) / lr, (w0 - two[name]) / lr
        assert grad_single.abs().max() > 0 or "position" in name, name
        torch.testing.assert_close(grad_ddp, grad_single, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    assert (tmp_path / "ddp" / "checkpoints").is_dir() and len(list((tmp_path / "ddp").glob("**/state.pt"))) == 1
    # Validation scores the same windows in one process or two (it used to take the per-process batch).
    valid = {name: [json.loads(line)["valid_bpb"] for line in (tmp_path / name / "metrics.jsonl").read_text()
                    .splitlines() if "valid_bpb" in line] for name in ("single", "ddp")}
    assert valid["ddp"] == pytest.approx(valid["single"], abs=1e-4)

    # Resume works the same under torchrun: both runs continue to step 2 and still agree.
    single = cli("train", "--resume", tmp_path / "single", "--steps", 2, "--quiet")
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "reformer", "train", "--resume",
                          str(tmp_path / "ddp"),
                          "--steps", "2", "--quiet"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = load_model(tmp_path / "single").state_dict(), load_model(tmp_path / "ddp").state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    assert step_losses(tmp_path / "ddp")[2] == pytest.approx(step_losses(tmp_path / "single")[2], abs=1e-5)


def test_bf16_autocast_trains(corpus_file, tmp_path):
    records = train(tmp_path, ReformerConfig.preset("tiny"),
                    TrainConfig(data=str(corpus_file), steps=3, batch_size=2, seq_len=64, bf16=True,
                                eval_every=3, checkpoint_every=3), progress=False)
    assert all(math.isfinite(r.get("loss", 0.0)) for r in records)
    assert math.isfinite(records[-1]["valid_bpb"])


def test_axial_embedding_backward_is_the_same_every_time():
    """Its backward used to accumulate repeated rows in an order that varied with thread timing (two runs
    of the small preset differed from step 3 on 2 threads)."""
    from reformer.nn.layers import AxialPositionEmbedding

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        embedding = AxialPositionEmbedding((32, 32), (64, 64))
        positions = torch.arange(512).repeat(8, 1)
        upstream = torch.randn(8, 512, 128)
        grads = set()
        for _ in range(20):
            embedding.zero_grad()
            (embedding(positions) * upstream).sum().backward()
            grads.add(b"".join(w.grad.numpy().tobytes() for w in embedding.weights))
        assert len(grads) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_runs_of_the_small_preset_are_identical_on_two_threads(corpus_file, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name in ("a", "b"):
            train(tmp_path / name, ReformerConfig.preset("small"),
                  TrainConfig(data=str(corpus_file), steps=6, batch_size=8, seq_len=256, eval_every=6,
                              checkpoint_every=6), progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")


@pytest.mark.parametrize("field,value", [("lr", math.inf), ("lr", math.nan), ("clip", math.nan),
                                         ("weight_decay", math.inf), ("momentum", math.nan), ("seed", 2**63),
                                         ("eval_batch_size", 0)])
def test_non_finite_or_out_of_range_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_validation_is_the_same_whatever_accum_and_the_eval_command_prints_it(corpus_file, tmp_path, capsys):
    """Validation scores eval_batches x eval_batch_size fixed windows: not the micro-batch (which changes
    with --accum and the number of processes). ``reformer eval RUN`` scores the same windows by default."""

    common = dict(data=str(corpus_file), steps=2, batch_size=4, seq_len=64, eval_every=2, checkpoint_every=2,
                  eval_batches=3, eval_batch_size=5)
    for accum in (1, 4):
        records = train(tmp_path / f"accum{accum}", ReformerConfig.preset("tiny"), TrainConfig(accum=accum, **common),
                        progress=False)
        logged = [r for r in records if "valid_bpb" in r][-1]["valid_bpb"]
        model = load_model(tmp_path / f"accum{accum}")
        from reformer.training.loop import evaluate

        again = evaluate(model, Corpus.open(str(corpus_file)), "valid", 64, 5, 3, torch.device("cpu"))
        assert again["bpb"] == logged and again["windows"] == 15
    result = run_in_process(["eval", tmp_path / "accum4"], capsys)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["windows"] == 15 and printed["bpb"] == round(logged, 5)


def test_a_relative_data_path_is_stored_absolute(corpus_file, tmp_path, monkeypatch):
    monkeypatch.chdir(corpus_file.parent)
    train(tmp_path / "run", ReformerConfig.preset("tiny"),
          TrainConfig(data=corpus_file.name, steps=1, batch_size=2, seq_len=32), progress=False)
    recorded = json.loads((tmp_path / "run" / "train.json").read_text())["data"]
    assert recorded == str(corpus_file.resolve())
    monkeypatch.chdir(tmp_path)
    assert max(r["step"] for r in train(tmp_path / "run", resume=True, changes={"steps": 2},
                                        progress=False)) == 2


def test_a_validation_split_shorter_than_a_window_is_found_before_training(tmp_path):
    from reformer.training.data import DataError

    data = tmp_path / "short.txt"
    data.write_bytes(bytes(range(32, 127)) * 20)      # 1900 bytes: a valid split of 95
    with pytest.raises(DataError, match="valid split .* fewer than one window of seq_len=128"):
        train(tmp_path / "run", ReformerConfig.preset("tiny"), TrainConfig(data=str(data), seq_len=128),
              progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_applies_what_may_change_and_refuses_the_rest(corpus_file, tmp_path):
    run = tmp_path / "run"
    train(run, ReformerConfig.preset("tiny"), TrainConfig(data=str(corpus_file), steps=2, batch_size=2, seq_len=32,
                                                          checkpoint_every=2), progress=False)
    with pytest.raises(ValueError, match="done all its 2 steps"):
        train(run, resume=True, progress=False)
    with pytest.raises(ValueError, match="below the 2 steps"):
        train(run, resume=True, changes={"steps": 1}, progress=False)
    with pytest.raises(ValueError, match=r"--lr 0.1 \(the run's: 0.003\)"):
        train(run, resume=True, changes={"steps": 4, "lr": 0.1}, progress=False)
    assert json.loads((run / "train.json").read_text())["steps"] == 2     # refused: nothing rewritten
    records = train(run, resume=True, changes={"steps": 4, "eval_every": 1, "lr": 0.003}, progress=False)
    assert json.loads((run / "train.json").read_text())["steps"] == 4
    assert {"step": 2, "event": "resume", "changed": {"steps": 4, "eval_every": 1}} in records
    assert [r["step"] for r in records if "valid_bpb" in r] == [2, 3, 4]


def test_tensorboard_mirrors_the_metrics(corpus_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = train(tmp_path, ReformerConfig.preset("tiny"),
                    TrainConfig(data=str(corpus_file), steps=4, batch_size=2, seq_len=32, eval_every=2),
                    progress=False, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in records if "loss" in r}, rel=1e-6)
    assert [e.step for e in events.Scalars("valid/bpb")] == [2, 4]
