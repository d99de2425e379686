"""A training step of a whole model, and the paper's speed figure.

step: forward, loss, backward and an Adam step of a 6-layer reversible byte LM (d_model 256, 4 heads x 64,
d_ff 1024, all LSH, 2 rounds, chunk 64) at each length, batch 1:
    ours        ReformerLM (lsh_window="bucket")
    hf          transformers' ReformerModelWithLMHead of the same shape
    full        the same ReformerLM with full attention (SDPA) in every layer
speed: seconds per step against length at a fixed number of tokens per batch (the paper's figure 5):
full attention and LSH with 1, 2, 4 and 8 rounds, batch = tokens / length.
Every point runs in a fresh process, median of --repeats; peak RSS is per process.

    python benchmarks/model.py step --lengths 4096 16384 65536
    python benchmarks/model.py speed --tokens 65536 --lengths 1024 4096 16384 65536
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CHUNK = 64


def n_buckets(length: int) -> int | tuple[int, int]:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from attention import n_buckets as rule   # the same bucket rule as the layer benchmark

    return rule(length)


def build(impl: str, length: int, n_hashes: int):
    """(model, loss function of a batch)."""

    if impl in ("ours", "full"):
        from reformer import ReformerConfig, ReformerLM

        cfg = ReformerConfig(d_model=256, n_heads=4, d_head=64, n_layers=6, d_ff=1024,
                             attn_layers="lsh" if impl == "ours" else "full", n_hashes=n_hashes,
                             chunk_length=CHUNK, n_buckets=n_buckets(length), max_seq_len=length,
                             ff_chunk_size=4096)
        model = ReformerLM(cfg).train()
        return model, model.loss
    from transformers import ReformerConfig, ReformerModelWithLMHead

    buckets = n_buckets(length)
    side = 2 ** ((length.bit_length() - 1) // 2)
    cfg = ReformerConfig(vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64,
                         feed_forward_size=1024, attn_layers=["lsh"] * 6, num_hashes=n_hashes,
                         lsh_attn_chunk_length=CHUNK, num_buckets=list(buckets) if isinstance(buckets, tuple)
                         else buckets, is_decoder=True, axial_pos_shape=[side, length // side],
                         axial_pos_embds_dim=[128, 128], max_position_embeddings=length,
                         hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                         chunk_size_feed_forward=4096, pad_token_id=0, eos_token_id=None)
    model = ReformerModelWithLMHead(cfg).train()
    return model, lambda ids: model(ids, labels=ids).loss


def child(impl: str, length: int, batch: int, n_hashes: int) -> None:
    import torch

    torch.manual_seed(0)
    model, loss_of = build(impl, length, n_hashes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (batch, length))
    start = time.perf_counter()
    loss_of(ids).backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"implementation": impl, "length": length, "batch": batch, "n_hashes": n_hashes,
                      "seconds": seconds, "peak_rss_mib": peak}))


def measure(impl: str, length: int, batch: int, n_hashes: int, repeats: int, timeout: float) -> dict | None:
    runs = []
    for _ in range(repeats):
        try:
            out = subprocess.run([sys.executable, __file__, "child", impl, str(length), str(batch),
                                  str(n_hashes)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"implementation": impl, "length": length, "error": f"over {timeout} s"}
        if out.returncode != 0:
            return {"implementation": impl, "length": length, "error": out.stderr.strip().splitlines()[-1:]}
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**runs[0], "repeats": repeats, "seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("step", "speed", "child"))
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--implementations", nargs="+", default=["ours", "hf", "full"])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (speed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.mode == "child":
        impl, length, batch, n_hashes = args.args
        child(impl, int(length), int(batch), int(n_hashes))
        return
    for length in args.lengths:
        if args.mode == "step":
            for impl in args.implementations:
                print(json.dumps(measure(impl, length, 1, 2, args.repeats, args.timeout)), flush=True)
        else:
            batch = max(1, args.tokens // length)
            for impl, n_hashes in [("full", 1), ("ours", 1), ("ours", 2), ("ours", 4), ("ours", 8)]:
                print(json.dumps(measure(impl, length, batch, n_hashes, args.repeats, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
