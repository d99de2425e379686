"""A training step of a whole model, and the paper's speed figure.

step: forward, loss, backward and an Adam step of a 6-layer reversible byte LM (d_model 256, 4 heads x 64,
d_ff 1024, all LSH, 2 rounds, chunk 64) at each length, batch 1:
    ours        ReformerLM (lsh_window="bucket")
    hf          transformers' ReformerModelWithLMHead of the same shape
    full        the same ReformerLM with full attention (SDPA) in every layer
speed: seconds per step against length at a fixed number of tokens per batch (the paper's figure 5):
full attention and LSH with 1, 2, 4 and 8 rounds, batch = tokens / length; this is
`reformer experiment speed` with other settings, written to --out.
Every point runs in a fresh process after a warm-up step, median of --repeats; peak RSS is per process.
--bf16 runs every implementation's forward and loss under bfloat16 autocast (the backward follows it).
The measuring code lives in reformer.experiments.speed; this script adds transformers' model.

    python benchmarks/model.py step --lengths 4096 16384 65536
    python benchmarks/model.py speed --tokens 65536 --lengths 1024 4096 16384 65536 --out /tmp/speed
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from reformer.config import transformers_n_buckets
from reformer.experiments import speed

IMPLEMENTATIONS = ("ours", "hf", "full")
LAYERS = 6


def build(impl: str, length: int, n_hashes: int, bf16: bool = False):
    """(model, loss function of a batch), the loss under bfloat16 autocast when ``bf16``."""
    model, loss_of = _build(impl, length, n_hashes)
    if not bf16:
        return model, loss_of

    def autocast_loss(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_of(ids)
    return model, autocast_loss


def _build(impl: str, length: int, n_hashes: int):
    if impl in speed.REFORMER_IMPLEMENTATIONS:
        return speed.build_reformer(impl, length, n_hashes, LAYERS)
    from transformers import ReformerConfig, ReformerModelWithLMHead

    buckets = transformers_n_buckets(length, speed.CHUNK)
    side = 2 ** ((length.bit_length() - 1) // 2)
    cfg = ReformerConfig(vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64,
                         feed_forward_size=1024, attn_layers=["lsh"] * LAYERS, num_hashes=n_hashes,
                         lsh_attn_chunk_length=speed.CHUNK,
                         num_buckets=list(buckets) if isinstance(buckets, tuple) else buckets,
                         is_decoder=True, axial_pos_shape=[side, length // side],
                         axial_pos_embds_dim=[128, 128], max_position_embeddings=length,
                         hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                         chunk_size_feed_forward=min(4096, length), pad_token_id=0, eos_token_id=None)
    model = ReformerModelWithLMHead(cfg).train()
    return model, lambda ids: model(ids, labels=ids).loss


def main() -> None:
    from reformer.ops import memory

    memory.offer_huge_pages_to_torch()   # as the reformer command does, before torch's first large block
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("step", "speed", "child"))
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (speed)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers (speed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--bf16", action="store_true", help="forward and loss under bfloat16 autocast (step)")
    parser.add_argument("--out", default="benchmarks/speed", help="report folder (speed)")
    args = parser.parse_args()
    if args.mode == "child":
        impl, length, n_hashes, bf16 = args.args
        result = speed.time_step(lambda n: build(impl, n, int(n_hashes), bf16 == "bf16"), int(length), 1)
        print(json.dumps({"implementation": impl, "length": int(length), **result}))
    elif args.mode == "step":
        for length in args.lengths:
            for impl in args.implementations:
                point = {"implementation": impl, "length": length, "batch": 1, "n_hashes": 2,
                         "dtype": "bf16-autocast" if args.bf16 else "float32"}
                command = [sys.executable, __file__, "child", impl, str(length), "2",
                           "bf16" if args.bf16 else "fp32"]
                print(json.dumps(speed.measure(command, point, args.repeats, args.timeout)), flush=True)
    else:
        settings = speed.SpeedSettings(tokens=args.tokens, lengths=tuple(args.lengths), n_layers=args.layers,
                                       repeats=args.repeats, timeout=args.timeout)
        speed.run(args.out, settings=settings)


if __name__ == "__main__":
    main()
