"""The ``reformer`` command: end-to-end runs and one-line errors with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_in_process


def cli(*args, text=True):
    return subprocess.run([sys.executable, "-m", "reformer", *map(str, args)], capture_output=True, text=text)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    import argparse

    path = tmp_path_factory.mktemp("data") / "code.py"
    path.write_bytes(Path(argparse.__file__).read_bytes())
    return path


@pytest.fixture(scope="module")
def trained_run(text_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = cli("train", "--data", text_file, "--run-dir", run, "--preset", "tiny", "--steps", 6,
                 "--batch-size", 4, "--seq-len", 64, "--eval-every", 3, "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 6
    return run


def test_train_writes_a_complete_run_folder(trained_run):
    for name in ("config.json", "train.json", "model.safetensors", "latest", "metrics.jsonl", "curves.png"):
        assert (trained_run / name).is_file(), name
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_bpb" in r] == [3, 6]
    assert all({"loss", "lr", "tokens_per_s", "elapsed"} <= set(r) for r in records if "loss" in r)


def test_generate_and_eval_on_a_run(trained_run):
    # Bytes, not text: a barely trained byte model need not write valid UTF-8.
    out = cli("generate", trained_run, "--prompt", "def ", "--max-new-tokens", 20, "--seed", 1, text=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"def ") and len(out.stdout) == 4 + 20 + 1
    again = cli("generate", trained_run, "--prompt", "def ", "--max-new-tokens", 20, "--seed", 1, text=False)
    assert again.stdout == out.stdout
    result = cli("eval", trained_run, "--batches", 2)
    assert result.returncode == 0, result.stderr
    assert 0 < json.loads(result.stdout)["bpb"] < 9


def test_existing_run_dir_is_not_overwritten_silently(trained_run, text_file):
    result = cli("train", "--data", text_file, "--run-dir", trained_run, "--preset", "tiny", "--quiet")
    assert result.returncode == 2 and "--resume" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["train", "--data", "/no/such/file.txt"], "does not exist"),
    (["train", "--data", "EMPTY"], "is empty"),
    (["train", "--preset", "tiny", "--seq-len", "5000"], "max_seq_len"),
    (["train", "--optimizer", "lion"], "optimizer"),
    (["train", "--preset", "giant"], "invalid choice: 'giant'"),
    (["train", "--lr", "fast"], "invalid float value: 'fast'"),
    (["train", "--resume", "/tmp"], "not a run folder"),
    (["generate", "/tmp"], "not a run folder"),
    (["eval", "/no/such/run"], "not a run folder"),
    (["convert", "--out", "x"], "exactly one"),
    (["train", "--steps", "-3"], "steps"),
    (["train", "--seed", str(2**64)], "--seed"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--clip", "nan"], "--clip"),
    (["train", "--weight-decay", "inf"], "--weight-decay"),
    (["train", "--device", "tpu"], "device"),
    (["generate", "RUN", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "RUN", "--temperature", "nan"], "--temperature"),
    (["generate", "RUN", "--top-p", "1.5"], "--top-p"),
    (["generate", "RUN", "--seed", str(2**64)], "--seed"),
    (["eval", "RUN", "--seq-len", "1"], "--seq-len"),
    (["eval", "RUN", "--seq-len", "0"], "--seq-len"),
    (["eval", "RUN", "--seq-len", "-5"], "--seq-len"),
    (["eval", "RUN", "--batches", "0"], "--batches"),
    (["eval", "RUN", "--batches", "-1"], "--batches"),
    (["eval", "RUN", "--batch-size", "0"], "--batch-size"),
    (["train", "--resume", "RUN", "--lr", "0.5"], "may change only"),
    (["train", "--resume", "RUN", "--d-model", "64"], "only --steps"),
    (["train", "--resume", "RUN", "--steps", "2"], "below the 6 steps"),
    (["train", "--preset", "duplication"], "does not cover"),
])
def test_bad_arguments_exit_2_with_one_clear_line(args, message, tmp_path, trained_run, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    args = [str(empty) if a == "EMPTY" else str(trained_run) if a == "RUN" else a for a in args]
    if args[0] == "train" and "--resume" not in args:
        args += ["--run-dir", str(tmp_path / "run")]
    result = run_in_process(args, capsys)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _subcommands():
    from reformer.cli import build_parser

    parser = build_parser()
    (choices,) = [a.choices for a in parser._actions if a.choices and a.dest == "command"]
    return choices


@pytest.mark.parametrize("command", ["train", "eval", "generate", "convert", "experiment"])
def test_help_explains_every_flag_once(command):
    """Every flag of the subcommand is in its --help with a text of its own, each default said once; every
    TrainConfig field is a flag of train."""
    import dataclasses

    from reformer.training.loop import TrainConfig

    parser = _subcommands()[command]
    result = cli(command, "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags
    for action in flags:
        assert action.help and action.option_strings[0] in help_text, action.dest
    assert "(default: None)" not in help_text
    for entry in help_text.split(" --"):   # one flag's text: its default at most once
        assert entry.count("(default") <= 1, entry
    if command == "train":
        for f in dataclasses.fields(TrainConfig):
            assert "--" + f.name.replace("_", "-") in help_text, f.name


@pytest.mark.slow
def test_convert_from_hf_then_generate_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.ReformerConfig(
        vocab_size=256, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64,
        attn_layers=["local", "lsh"], axial_pos_shape=[16, 16], axial_pos_embds_dim=[16, 16],
        max_position_embeddings=256, num_buckets=4, num_hashes=2, hash_seed=3, lsh_attn_chunk_length=8,
        local_attn_chunk_length=8, is_decoder=True)
    transformers.ReformerModelWithLMHead(hf_config).save_pretrained(tmp_path / "hf")
    result = cli("convert", "--from-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    out = cli("generate", tmp_path / "run", "--prompt", "abc", "--max-new-tokens", 5, "--temperature", 0,
              text=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"abc")
    back = cli("convert", "--to-hf", tmp_path / "run", "--out", tmp_path / "hf2")
    assert back.returncode == 0, back.stderr
    reloaded = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "hf2")
    original = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "hf")
    for (name, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_version():
    from reformer import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"reformer {__version__}"


def test_a_non_utf8_prompt_is_taken_as_its_bytes(trained_run):
    prompt = b"caf\xe9 "
    out = subprocess.run([sys.executable.encode(), b"-m", b"reformer", b"generate", bytes(trained_run), b"--prompt",
                          prompt, b"--max-new-tokens", b"3", b"--stop", b"\xff"], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(prompt)


def test_print_config_resolves_the_preset_and_config_file_trains_it(tmp_path, text_file):
    result = cli("train", "--preset", "tiny", "--n-layers", 3, "--print-config")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["model"]["n_layers"] == 3 and resolved["train"]["seq_len"] == 128   # tiny's own default
    small = json.loads(cli("train", "--n-layers", 6, "--print-config").stdout)
    assert small["model"]["attn_layers"] == ["local", "lsh"] * 3      # the preset's pattern, repeated
    config = tmp_path / "config.json"
    resolved["train"].update(steps=2, data=str(text_file))
    config.write_text(json.dumps(resolved))
    run = tmp_path / "run"
    trained = cli("train", "--preset", "tiny", "--config", config, "--run-dir", run, "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run / "config.json").read_text())["n_layers"] == 3
    assert json.loads((run / "train.json").read_text())["steps"] == 2


def test_a_preset_trains_with_no_other_flag(tmp_path):
    """The tiny preset brings its seq_len (its model takes 256, the default 512 failed before)."""
    result = cli("train", "--preset", "tiny", "--steps", 2, "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_the_run_says_what_it_does_off_a_terminal(trained_run, tmp_path, text_file):
    """A start-up summary, then plain lines (stderr is not a terminal here), then the final JSON line."""
    result = cli("train", "--data", text_file, "--run-dir", tmp_path / "run", "--preset", "tiny", "--steps", 3,
                 "--seq-len", 64, "--eval-every", 3)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for start in ("run ", "data ", "model ", "training ", "device "):
        assert any(line.startswith(start) for line in lines), start
    assert "attention core native" in result.stderr or "attention core eager" in result.stderr
    assert "step 3/3: valid" in result.stderr and "\r" not in result.stderr
    assert json.loads(result.stdout)["step"] == 3


def test_eval_prints_what_training_logged_last(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["valid_bpb"] for r in records if "valid_bpb" in r][-1]
    result = cli("eval", trained_run)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bpb"] == round(logged, 5)


@pytest.mark.parametrize("idle_share,cores,expected", [(1.0, 2, 2), (0.5, 2, 1), (0.0, 2, 1), (0.75, 4, 3),
                                                        (0.3, 8, 2)])
def test_threads_follow_the_idle_cores(idle_share, cores, expected):
    """A core another process keeps busy gets no thread of ours (OpenMP threads wait for the slowest)."""
    from reformer.cli import free_cores

    assert free_cores((1000, 2000), (1000 + int(1000 * idle_share), 3000), cores) == expected
    assert free_cores((5, 5), (5, 5), cores) == cores      # no time passed: no evidence of load


def test_omp_num_threads_decides_when_set(tmp_path, text_file):
    result = subprocess.run([sys.executable, "-m", "reformer", "train", "--data", str(text_file), "--run-dir",
                             str(tmp_path / "run"), "--preset", "tiny", "--steps", "1", "--seq-len", "64"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert ", 1 thread (OMP_NUM_THREADS sets it)," in result.stderr
