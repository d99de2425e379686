"""The ``reformer`` command: train, eval, generate, convert, experiment.

Bad arguments (a missing file, an empty corpus, a length over max_seq_len, an unknown optimiser, a
folder that is not a run) end with exit status 2 and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from .config import ATTENTION_KINDS, LSH_WINDOWS, PRESET_FIELDS, PRESETS, ReformerConfig
from .files import FolderInUse
from .ops import memory
from .ops.backend import ATTENTION_BACKENDS
from .training.checkpoint import CheckpointError, is_run_dir
from .training.data import DataError
from .training.loop import RESUMABLE, TrainConfig, flag_name
from .version import __version__

DEFAULT_RUN_DIR = "runs/default"
REPETITION_PENALTY = 1.3   # what made the quick start's samples read as code (README)


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


class DefaultsOnce(argparse.HelpFormatter):
    """Each flag's default in its help, once: appended where the text does not say it already, and never
    for a default of None (nothing given) or False (a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: {action.default})"


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (no usage block): "reformer train: error: ..."."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(minimum: int):
    """An argparse type: an int >= ``minimum`` (and below 2^63, what torch's integers hold)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not minimum <= value < 2**63:
            raise argparse.ArgumentTypeError(f"must be an int in [{minimum}, 2^63), got {value}")
        return value
    parse.__name__ = "int"
    return parse


def finite(minimum: float | None = None, maximum: float | None = None):
    """An argparse type: a finite float in [minimum, maximum]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or \
                (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be a finite number in [{minimum}, {maximum}], got {text}")
        return value
    parse.__name__ = "float"
    return parse


def _add_device(p) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto: CUDA where there is one")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a byte-level Reformer LM (default: small model on stdlib)",
                       formatter_class=DefaultsOnce,
                       description="Train a byte-level Reformer language model. With no arguments: the "
                       "'small' preset on the Python standard library's source, a few minutes on 2 cores. "
                       "A preset brings its model and its training defaults; flags override them. Under "
                       "torchrun (torchrun --nproc_per_node N -m reformer train ...) it trains with "
                       "DistributedDataParallel; --batch-size is the global batch. Ctrl-C stops after the "
                       "current step with a checkpoint (exit status 130); --resume continues.")
    p.add_argument("--run-dir", default=None, help=f"output folder (default: {DEFAULT_RUN_DIR})")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint; "
                   f"only {', '.join(map(flag_name, RESUMABLE))} may change")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --run-dir")
    p.add_argument("--config", metavar="FILE", help="a JSON file of {\"model\": {...}, \"train\": {...}} (as "
                   "--print-config writes it); flags override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the final line")
    p.add_argument("--tensorboard", action="store_true", help="also write the metrics as TensorBoard scalars to "
                   "RUN_DIR/tensorboard (needs: pip install tensorboard); metrics.jsonl stays the record")
    _add_device(p)
    # Every TrainConfig field is a flag; None (not given) leaves the preset's (or the field's) default.
    training = p.add_argument_group("training (TrainConfig; defaults of the 'small' preset)")
    for f in dataclasses.fields(TrainConfig):
        flag, help_text = flag_name(f.name), f"{f.metadata['help']} (default: {f.default})"
        if f.type in ("bool", bool):
            training.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            kind = {"int": at_least(-2**63), "float": finite()}.get(
                f.type if isinstance(f.type, str) else f.type.__name__, str)
            training.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"], help=help_text)
    model = p.add_argument_group("model (ReformerConfig: a preset, and fields that override it)")
    model.add_argument("--preset", default="small", choices=PRESETS, help="model preset and its training defaults")
    model.add_argument("--attn", help=f"attention of every layer ({', '.join(ATTENTION_KINDS)}) or a "
                       "comma-separated list, one per layer (default: the preset's)")
    for flag, kind, help_text in (("--n-layers", int, "number of layers (the preset's attention pattern repeats)"),
                                  ("--d-model", int, "model width"),
                                  ("--n-hashes", int, "LSH hashing rounds"),
                                  ("--chunk-length", int, "LSH chunk length"),
                                  ("--dropout", float, "dropout probability"),
                                  ("--max-seq-len", int, "longest sequence the model accepts")):
        model.add_argument(flag, type=kind, help=f"{help_text} (default: the preset's)")
    model.add_argument("--lsh-window", choices=LSH_WINDOWS, help="LSH window (default: the preset's)")
    model.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                       help="which attention core runs (default: auto)")
    model.add_argument("--no-reversible", action="store_true", help="plain residual layers (more memory)")


MODEL_FLAGS = ("attn", "n_layers", "d_model", "n_hashes", "chunk_length", "lsh_window", "dropout", "max_seq_len",
               "attention_backend")


def _model_overrides(args) -> dict:
    overrides = {}
    if args.attn:
        layers = args.attn.split(",")
        overrides["attn_layers"] = layers[0] if len(layers) == 1 else tuple(layers)
        if len(layers) > 1 and args.n_layers is None:
            overrides["n_layers"] = len(layers)
    for name in MODEL_FLAGS[1:]:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_reversible:
        overrides["reversible"] = False
    return overrides


def _model_config(args, base: dict) -> ReformerConfig:
    """The preset (or --config's model) with the flags applied; --n-layers alone repeats its attention pattern."""
    fields = {**PRESET_FIELDS[args.preset], **base, **_model_overrides(args)}
    if args.n_layers is not None and not args.attn:
        pattern = fields.get("attn_layers", "lsh")
        if not isinstance(pattern, str):
            fields["attn_layers"] = tuple(pattern[i % len(pattern)] for i in range(args.n_layers))
    return ReformerConfig(**fields)


def _read_config_file(path: str) -> tuple[dict, dict]:
    from .weights import read_json

    data = read_json(path, UsageError)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown or not all(isinstance(data.get(k, {}), dict) for k in ("model", "train")):
        raise UsageError(f"{path} must hold {{\"model\": {{...}}, \"train\": {{...}}}}, got keys {sorted(data)}")
    return data.get("model", {}), data.get("train", {})


def _given_training(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name) is not None}


def cmd_train(args) -> int:
    from .training.loop import Diverged, Interrupted, preset_training, train

    progress = "quiet" if args.quiet else "auto"
    try:
        if args.resume:
            given_model = [name for name in MODEL_FLAGS if getattr(args, name) is not None]
            if given_model or args.no_reversible or args.config or args.overwrite or args.run_dir:
                raise UsageError("a resume continues the run as it was: only "
                                 f"{', '.join(map(flag_name, RESUMABLE))} may be given with "
                                 "--resume")
            if not is_run_dir(Path(args.resume)):
                raise UsageError(f"{args.resume} is not a run folder (no config.json in it)")
            run_dir = Path(args.resume)
            records = train(run_dir, resume=True, progress=progress, changes=_given_training(args),
                            device=args.device, tensorboard=args.tensorboard)
        else:
            run_dir = Path(args.run_dir or DEFAULT_RUN_DIR)
            model_base, train_base = _read_config_file(args.config) if args.config else ({}, {})
            try:
                model_config = _model_config(args, model_base)
                train_config = preset_training(args.preset, **{**train_base, **_given_training(args)})
            except (ValueError, TypeError) as error:
                raise UsageError(str(error)) from error
            if args.print_config:
                print(json.dumps({"model": model_config.to_dict(), "train": dataclasses.asdict(train_config)},
                                 indent=2))
                return 0
            records = train(run_dir, model_config, train_config, progress=progress, overwrite=args.overwrite,
                            device=args.device, tensorboard=args.tensorboard)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return 130
    except Diverged as stop:
        print(f"reformer train: {stop}", file=sys.stderr)
        return 1
    valid = [r for r in records if "valid_bpb" in r]
    if valid:
        print(json.dumps({"run_dir": str(run_dir), "step": valid[-1]["step"],
                          "valid_bpb": round(valid[-1]["valid_bpb"], 4)}))
    return 0


def cmd_eval(args) -> int:
    from .training.checkpoint import load_model, read_run_json
    from .training.data import Corpus
    from .training.loop import evaluate, resolve_device

    model = load_model(args.run_dir, resolve_device(args.device))
    train_json = read_run_json(Path(args.run_dir) / "train.json") \
        if (Path(args.run_dir) / "train.json").is_file() else {}
    data = args.data or train_json.get("data")
    if data is None:
        raise UsageError("this run folder records no data source: pass --data")
    seq_len = args.seq_len or train_json.get("seq_len", min(1024, model.config.max_seq_len))
    if seq_len > model.config.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len ({model.config.max_seq_len})")
    # By default the windows training validated on: its number is the one training logged last.
    batch_size = args.batch_size or train_json.get("eval_batch_size", TrainConfig.eval_batch_size)
    batches = args.batches or train_json.get("eval_batches", TrainConfig.eval_batches)
    corpus = Corpus.open(data, train_json.get("glob", "**/*"))
    result = evaluate(model, corpus, args.split, seq_len, batch_size, batches,
                      next(model.parameters()).device, n_hashes=args.n_hashes)
    print(json.dumps({"split": args.split, "seq_len": seq_len, "windows": result["windows"],
                      **{k: round(v, 5) for k, v in result.items() if k != "windows"}}))
    return 0


def cmd_generate(args) -> int:
    from .generate import generate
    from .training.checkpoint import load_model
    from .training.loop import resolve_device

    model = load_model(args.run_dir, resolve_device(args.device))
    # The bytes as given on the command line (os.fsencode undoes the decoding: any bytes, UTF-8 or not).
    prompt, stop = os.fsencode(args.prompt), os.fsencode(args.stop)
    if model.config.vocab_size < 256:
        raise UsageError(f"this model's vocabulary ({model.config.vocab_size}) does not cover bytes")
    if len(prompt) >= model.config.max_seq_len:
        raise UsageError(f"the prompt ({len(prompt)} bytes) must be shorter than max_seq_len "
                         f"({model.config.max_seq_len})")
    out = sys.stdout.buffer
    out.write(prompt)

    def emit(token: int) -> None:
        out.write(bytes([token]) if token < 256 else b"")
        out.flush()

    generate(model, list(prompt), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, stop=stop, use_cache=not args.no_cache, on_token=emit,
             repetition_penalty=args.repetition_penalty)
    out.write(b"\n")
    out.flush()
    return 0


def cmd_convert(args) -> int:
    from .interop import hf
    from .training.checkpoint import load_model

    if bool(args.from_hf) == bool(args.to_hf):
        raise UsageError("give exactly one of --from-hf FOLDER or --to-hf RUN_DIR")
    out = Path(args.out)
    if args.from_hf:
        if not Path(args.from_hf).is_dir():
            raise UsageError(f"{args.from_hf} is not a folder")
        hf.load_hf(args.from_hf).save_pretrained(out)
    else:
        hf.save_hf(load_model(args.to_hf), out)
    print(json.dumps({"written": str(out)}))
    return 0


def cmd_experiment(args) -> int:
    from .experiments import default_out_dir, run_experiment

    out = Path(args.out) if args.out else default_out_dir(args.name, args.quick)
    print(f"reformer experiment {args.name}{' --quick' if args.quick else ''}: writing to {out}", flush=True)
    record = run_experiment(args.name, out, quick=args.quick, seed=args.seed,
                            log=lambda line: print(line, flush=True))
    print(json.dumps({"experiment": args.name, "written": str(out), "wall_seconds": record["wall_seconds"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="reformer", description="Reformer: LSH attention and reversible "
                                     "layers for very long sequences.")
    parser.add_argument("--version", action="version", version=f"reformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)

    p = sub.add_parser("eval", help="bits per byte of a trained run on a split", formatter_class=DefaultsOnce,
                       description="Bits per byte of a run's latest weights on fixed, non-overlapping windows "
                       "of a split of its corpus (or of --data). Prints one JSON line.")
    p.add_argument("run_dir", help="a run folder written by 'reformer train'")
    p.add_argument("--data", help="corpus (default: the one the run trained on)")
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"), help="which split")
    p.add_argument("--seq-len", type=at_least(2), help="window length (default: the training length)")
    p.add_argument("--batch-size", type=at_least(1), help="windows per batch (default: training's validation)")
    p.add_argument("--batches", type=at_least(1), help="batches to evaluate (default: training's validation)")
    p.add_argument("--n-hashes", type=at_least(1), help="hashing rounds at evaluation (default: the model's)")
    _add_device(p)

    p = sub.add_parser("generate", help="sample text from a trained run", formatter_class=DefaultsOnce,
                       description="Continue --prompt with bytes sampled from a run's latest weights, streamed "
                       "to standard output (cached decoding where the model allows it).")
    p.add_argument("run_dir", help="a run folder written by 'reformer train' or 'reformer convert'")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=at_least(1), default=300, help="bytes to generate at most")
    p.add_argument("--temperature", type=finite(0.0), default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=at_least(1), default=None, help="sample among the k most likely bytes")
    p.add_argument("--top-p", type=finite(0.0, 1.0), default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=at_least(0), default=0, help="sampling seed")
    p.add_argument("--repetition-penalty", type=finite(1.0), default=REPETITION_PENALTY,
                   help="divide the logits of the bytes among the last 32 by this (1 = off)")
    p.add_argument("--stop", default="", help="stop after any of these characters")
    p.add_argument("--no-cache", action="store_true", help="recompute the full forward for every byte")
    _add_device(p)

    p = sub.add_parser("convert", help="import or export HuggingFace transformers Reformer checkpoints",
                       formatter_class=DefaultsOnce,
                       description="Import a transformers Reformer folder (save_pretrained) as a run folder, or "
                       "export a run folder for transformers' from_pretrained. Only models with "
                       "lsh_window='chunk' (the anchors' window) export: transformers has no bucket window. "
                       "To export, train with --lsh-window chunk and only local and lsh layers. transformers "
                       "itself is needed only to load the export.")
    p.add_argument("--from-hf", metavar="FOLDER", help="a transformers save_pretrained folder to import")
    p.add_argument("--to-hf", metavar="RUN_DIR", help="a run folder to export")
    p.add_argument("--out", required=True, help="the folder to write")

    from .experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="reproduce one of the paper's claims and write a report",
                       formatter_class=DefaultsOnce,
                       description="Run an experiment and write results.json, README.md and plots to "
                       "docs/results/NAME (--quick: a smoke run under 2 minutes, to runs/experiments/NAME-quick).")
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    p.add_argument("--quick", action="store_true", help="a small, fast version (a smoke test, not a result)")
    p.add_argument("--out", help="output folder (default: see above)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of weights, data and hashing")
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "convert": cmd_convert,
            "experiment": cmd_experiment}


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all cores from /proc/stat (Linux), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def free_cores(before: tuple[int, int], after: tuple[int, int], cores: int) -> int:
    """Cores that other processes left idle between two _cpu_times samples, at least 1."""
    idle, total = after[0] - before[0], after[1] - before[1]
    busy = cores * (1 - idle / total) if total > 0 else 0.0
    return max(1, min(cores, cores - round(busy)))


def choose_threads() -> None:
    """torch's threads for this command: as many as there are idle cores now, unless OMP_NUM_THREADS says.

    torch takes one thread per core; where another process keeps a core busy, its OpenMP threads wait for
    the slowest one and a step takes longer than on fewer threads."""
    import time

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return
    before = _cpu_times()
    if before is None:
        return
    time.sleep(0.2)
    after = _cpu_times()
    if after is not None:
        torch.set_num_threads(min(torch.get_num_threads(), free_cores(before, after, os.cpu_count() or 1)))


def main(argv: list[str] | None = None) -> int:
    # Before torch's first large block: the command's big tensors on huge pages (see ops/memory.py).
    memory.offer_huge_pages_to_torch()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "eval", "generate") and os.environ.get("WORLD_SIZE", "1") == "1":
        choose_threads()
    try:
        return COMMANDS[args.command](args)
    except (UsageError, DataError, CheckpointError, FolderInUse) as error:
        parser.exit(2, f"reformer {args.command}: error: {error}\n")
    except ValueError as error:
        # Raised by config and argument validation (they name the field); bugs raise other types.
        parser.exit(2, f"reformer {args.command}: error: {error}\n")
    except OSError as error:   # the machine's refusal (a full disk, no permission): one line, not a traceback
        parser.exit(1, f"reformer {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
