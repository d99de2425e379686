"""Fault injection: kills at random moments (inside checkpoint writes too), Ctrl-C, a full disk, concurrent
writers and corrupted files. Whatever happens, a run either continues bit for bit or stops with one line
naming what is wrong; it never loads damaged data or mixes two writers."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_in_process
from reformer import ReformerLM
from reformer.files import FolderInUse, FolderLock
from reformer.training.checkpoint import CheckpointError, load_checkpoint, load_model
from reformer.training.metrics import MetricsLog

STEPS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import argparse
    import dataclasses

    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(Path(argparse.__file__).read_bytes() + Path(dataclasses.__file__).read_bytes())
    return path


def train_args(data, run_dir, steps=STEPS, every=1):
    return ["train", "--data", data, "--run-dir", run_dir, "--preset", "tiny", "--steps", steps, "--batch-size", 4,
            "--seq-len", 64, "--eval-every", 8, "--checkpoint-every", every, "--dropout", 0.1, "--quiet"]


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "reformer", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


@pytest.fixture
def run_cli(capsys):
    return lambda *args: run_in_process(args, capsys)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4), copied by the tests that damage it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = cli(*train_args(corpus, run, steps=4, every=2))
    assert result.returncode == 0, result.stderr
    return run


def copy_of(run, tmp_path):
    import shutil

    return Path(shutil.copytree(run, tmp_path / run.name, ignore=shutil.ignore_patterns(".lock")))


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "reformer", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def wait_for_steps(run_dir, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists() and len(losses_safe(path)) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {n}")


def losses_safe(path):
    try:
        return [line for line in path.read_text().splitlines() if '"loss"' in line]
    except OSError:
        return []


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run every faulty one must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = cli(*train_args(corpus, run))
    assert result.returncode == 0, result.stderr
    return losses(run)


@pytest.mark.slow
def test_kills_at_random_moments_lose_nothing(corpus, reference, tmp_path):
    """kill -9 at random moments of a run that checkpoints every step (so most kills land inside a checkpoint
    write); after each, the latest checkpoint loads and --resume continues; the end is bit-identical."""
    run, rng = tmp_path / "run", random.Random(0)
    proc = start(*train_args(corpus, run))
    kills = 0
    while kills < 5:
        wait_for_steps(run, 2, proc)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        weights, state = load_checkpoint(run)             # complete and verified, whatever the moment
        load_model(run)
        assert 1 <= state["step"] <= STEPS
        if state["step"] == STEPS:
            break
        proc = start("train", "--resume", run, "--quiet")
    proc.wait()
    if proc.returncode != 0:                              # the last kill may have come after the last step
        assert "done all its" in proc.stderr.read()
    assert kills >= 3
    assert losses(run) == reference
    assert not [p for p in run.rglob(".*") if p.name != ".lock"], "temporary files left behind"


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_resume_continues(corpus, reference, tmp_path):
    run = tmp_path / "run"
    proc = start(*train_args(corpus, run, every=100))
    wait_for_steps(run, 5, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = load_checkpoint(run)[1]["step"]
    assert 5 <= step < STEPS
    assert f"interrupted at step {step}; resume with: reformer train --resume {run}" in stderr
    resumed = cli("train", "--resume", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == reference


@pytest.mark.slow
def test_a_second_writer_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    first = start(*train_args(corpus, run, steps=100_000, every=1000))
    try:
        wait_for_steps(run, 1, first)
        for args in (["train", "--resume", run, "--quiet"], train_args(corpus, run) + ["--overwrite"]):
            second = cli(*args)
            assert second.returncode == 2, second.stderr
            assert "is in use" in second.stderr and f"process {first.pid}" in second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run was disturbed"
        assert (run / "config.json").is_file()
    finally:
        first.kill()
        first.wait()
    with FolderLock(run):            # released when its holder died
        with pytest.raises(FolderInUse, match="in use"):
            FolderLock(run).acquire()


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupted_files_are_refused_with_their_name(trained, tmp_path, run_cli):
    run = copy_of(trained, tmp_path / "a")
    latest = run / (run / "latest").read_text().strip()
    # A garbled byte in the tensors of the run's model: eval refuses it (it used to print NaN or other numbers).
    _flip_byte(run / "model.safetensors", 100)
    result = run_cli("eval", run, "--batches", 1)
    assert result.returncode == 2 and "model.safetensors is corrupted" in result.stderr, result.stderr
    # ... of the checkpoint's training state: resume refuses it.
    _flip_byte(latest / "state.pt", 200)
    result = run_cli("train", "--resume", run, "--steps", 6, "--quiet")
    assert result.returncode == 2 and "state.pt is corrupted" in result.stderr, result.stderr
    # config.json edited into another model of the same shapes (another chunk length).
    run2 = copy_of(trained, tmp_path / "b")
    config = json.loads((run2 / "config.json").read_text())
    (run2 / "config.json").write_text(json.dumps({**config, "chunk_length": 16}))
    for args in (["eval", run2, "--batches", 1], ["generate", run2, "--max-new-tokens", 2],
                 ["train", "--resume", run2, "--steps", 6, "--quiet"]):
        result = run_cli(*args)
        assert result.returncode == 2 and "another configuration" in result.stderr, (args, result.stderr)
    with pytest.raises(ValueError, match="another configuration"):
        ReformerLM.from_pretrained(run2)
    # The runtime choice of core is not part of what the weights belong to.
    (run2 / "config.json").write_text(json.dumps({**config, "attention_backend": "eager"}))
    assert run_cli("eval", run2, "--batches", 1).returncode == 0


@pytest.mark.parametrize("name,content,message", [
    ("config.json", "{not json", "config.json is not valid JSON"),
    ("config.json", '{"d_model": "wide"}', "config.json is not a valid ReformerConfig"),
    ("train.json", "[1, 2]", "train.json does not hold a JSON object"),
    ("train.json", '{"steps": 4, "colour": "red"}', "train.json is not a valid TrainConfig"),
    ("latest", "../../etc\n", "latest names"),
])
def test_malformed_run_files_name_the_file(trained, tmp_path, run_cli, name, content, message):
    run = copy_of(trained, tmp_path)
    (run / name).write_text(content)
    result = run_cli("train", "--resume", run, "--steps", 6, "--quiet")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_edited_train_json_is_detected(trained, tmp_path, run_cli):
    run = copy_of(trained, tmp_path)
    recorded = json.loads((run / "train.json").read_text())
    (run / "train.json").write_text(json.dumps({**recorded, "lr": 0.5}))
    result = run_cli("train", "--resume", run, "--steps", 6, "--quiet")
    assert result.returncode == 2 and "train.json does not match the checkpoint" in result.stderr, result.stderr


def test_a_cut_metrics_line_is_repaired_on_resume(trained, tmp_path, run_cli):
    run = copy_of(trained, tmp_path)
    expected = losses(run)
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 5, "lo')      # a crash in the middle of a line
    resumed = run_cli("train", "--resume", run, "--steps", 6, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, 7)) and all(got[s] == expected[s] for s in expected)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up. Needs the right to mount (root in a container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip() or 'not permitted'}), so no "
                    "real full disk; the failure paths are covered by test_train's injected write errors")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Fill the disk up to ``leave`` bytes free."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
    while True:   # the last pages, one block at a time
        stat = os.statvfs(disk)
        if stat.f_bavail * stat.f_frsize <= leave:
            return
        with open(disk / "filler", "ab") as f:
            try:
                f.write(b"\0" * stat.f_frsize)
            except OSError:
                return


def test_a_full_disk_stops_with_one_line_and_keeps_the_checkpoint(trained, small_disk, run_cli):
    run = copy_of(trained, small_disk)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    _fill(small_disk, leave=64 * 1024)     # room for metrics lines, not for a checkpoint
    result = run_cli("train", "--resume", run, "--steps", 8, "--quiet")
    assert result.returncode == 2, result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "the previous checkpoint (checkpoints/step-00000004) is intact" in result.stderr
    assert load_checkpoint(run)[1]["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before     # nothing half-written left
    (small_disk / "filler").unlink()
    resumed = run_cli("train", "--resume", run, "--steps", 8, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert max(losses(run)) == 8


def test_a_full_disk_never_leaves_half_a_metrics_line(small_disk):
    log = MetricsLog(small_disk / "metrics.jsonl", resume_step=None)
    _fill(small_disk, leave=0)
    with pytest.raises(CheckpointError, match="No space left on device|short write"):
        for step in range(100_000):
            log.write({"step": step, "loss": 1.0 / (step + 1), "padding": "x" * 200})
    text = (small_disk / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    assert all(json.loads(line) for line in text.splitlines())


def test_weights_of_a_diverged_run_are_never_saved(corpus, tmp_path, run_cli):
    run = tmp_path / "run"
    result = run_cli(*train_args(corpus, run, steps=40, every=1), "--lr", "1e30", "--warmup", 0)
    assert result.returncode == 1, result.stderr
    assert "training diverged at step" in result.stderr and "Traceback" not in result.stderr
    model = load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged"
