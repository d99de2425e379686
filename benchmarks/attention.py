"""One causal attention layer, forward + backward, side by side with the anchors and full attention.

Layers (batch 1, d_model 256, 4 heads x 64, LayerNorm + attention + output projection):
    ours-bucket   our LSHSelfAttention, lsh_window="bucket" (4 rounds, chunk 64)
Buckets follow transformers' rule for each length (factorised from 16K tokens on: 16 x 32, 32 x 64),
for our layers and transformers' alike; reformer_pytorch derives its own (length / 64, unfactorised).
    ours-chunk    our LSHSelfAttention, lsh_window="chunk" (the anchors' semantics)
    ours-local    our LocalSelfAttention (chunk 64, one chunk back)
    hf            transformers' ReformerAttention with its LSHSelfAttention (4 rounds, chunk 64)
    lucidrains    reformer_pytorch's LSHSelfAttention (4 rounds, bucket size 64)
    sdpa          full attention through torch.nn.functional.scaled_dot_product_attention

Every point runs in a fresh process (peak RSS is per process) after a warm-up at 1K tokens; the
median of --repeats runs is reported. Prints one JSON object per point and, for our layers, the
floating-point work of the step against the machine's measured float32 matmul throughput: measured once
when the run starts, and again in each point's process right after its step (this machine's speed moves
by half within minutes; the point's own ceiling compares the step with the matmul under the same
conditions). "fraction_of_ceiling" uses the point's ceiling, "fraction_of_run_ceiling" the run's.
Peers come from `pip install -e .[bench]`.

    python benchmarks/attention.py --lengths 1024 4096 16384 65536 --plot benchmarks/attention.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from reformer.config import transformers_n_buckets
from reformer.experiments.speed import measure, peak_rss_mib

D_MODEL, HEADS, D_HEAD, HASHES, CHUNK = 256, 4, 64, 4, 64
IMPLEMENTATIONS = ("ours-bucket", "ours-chunk", "ours-local", "hf", "lucidrains", "sdpa")


def n_buckets(length: int) -> int | tuple[int, int]:
    """transformers' rule for num_buckets=None (shared with the model benchmark and the speed experiment)."""
    return transformers_n_buckets(length, CHUNK)


def build(impl: str, length: int):
    """The layer as a function (batch, length, d_model) -> (batch, length, d_model)."""
    import torch

    if impl.startswith("ours") or impl == "sdpa":
        from reformer import ReformerConfig
        from reformer.nn.reversible import AttentionBranch

        kind = {"ours-bucket": "lsh", "ours-chunk": "lsh", "ours-local": "local", "sdpa": "full"}[impl]
        cfg = ReformerConfig(d_model=D_MODEL, n_heads=HEADS, d_head=D_HEAD, n_layers=1, attn_layers=kind,
                             n_hashes=HASHES, chunk_length=CHUNK, n_buckets=n_buckets(length),
                             max_seq_len=length, lsh_window="chunk" if impl == "ours-chunk" else "bucket",
                             position_embedding="none")
        return AttentionBranch(cfg, 0).train()
    if impl == "hf":
        from transformers import ReformerConfig as HFConfig
        from transformers.models.reformer.modeling_reformer import ReformerAttention

        cfg = HFConfig(hidden_size=D_MODEL, num_attention_heads=HEADS, attention_head_size=D_HEAD,
                       attn_layers=["lsh"], num_hashes=HASHES, lsh_attn_chunk_length=CHUNK,
                       num_buckets=list(n_buckets(length)) if isinstance(n_buckets(length), tuple)
                       else n_buckets(length), is_decoder=True, max_position_embeddings=length,
                       lsh_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        layer = ReformerAttention(cfg).train()
        return lambda x: layer(x).hidden_states
    if impl == "lucidrains":
        from reformer_pytorch import LSHSelfAttention

        layer = LSHSelfAttention(dim=D_MODEL, heads=HEADS, dim_head=D_HEAD, bucket_size=CHUNK,
                                 n_hashes=HASHES, causal=True).train()
        norm = torch.nn.LayerNorm(D_MODEL)
        return lambda x: layer(norm(x))
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLEMENTATIONS}")


def flops(impl: str, length: int) -> float:
    """Matmul work of one forward + backward of our layers (projections 3x forward, core 14 N W d)."""
    projections = (4 if impl in ("ours-local", "sdpa") else 3) * 2 * length * D_MODEL * HEADS * D_HEAD
    width = 2 * CHUNK
    items = length * (HASHES if impl.startswith("ours-") and impl != "ours-local" else 1)
    return 3 * projections + 14 * items * width * D_HEAD * HEADS


def matmul_ceiling() -> float:
    """Measured float32 matmul throughput of this machine (FLOP/s), median of 5."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times)


def child(impl: str, length: int) -> None:
    import torch

    torch.manual_seed(0)
    for n in (min(1024, length), length):   # warm-up, then the measured step
        layer = build(impl, n)
        x = torch.randn(1, n, D_MODEL, requires_grad=True)
        start = time.perf_counter()
        layer(x).sum().backward()
        seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    ceiling = matmul_ceiling() / 1e9   # after the peak is read: its 48 MiB must not count
    print(json.dumps({"implementation": impl, "length": length, "seconds": seconds, "peak_rss_mib": peak,
                      "ceiling_gflops": ceiling}))


def plot(points: list[dict], path: str) -> None:
    from reformer.plotting import time_and_memory

    time_and_memory(points, IMPLEMENTATIONS, "peak_rss_mib", "seconds (forward + backward)", "peak RSS (MiB)",
                    f"one causal attention layer, d_model {D_MODEL}, {HEADS} heads x {D_HEAD}, float32, CPU", path)


def main() -> None:
    from reformer.ops import memory

    memory.offer_huge_pages_to_torch()   # as the reformer command does, before torch's first large block
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per point")
    parser.add_argument("--plot", help="write a log-log PNG of time and memory against length")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    ceiling = matmul_ceiling()
    print(json.dumps({"matmul_ceiling_gflops": round(ceiling / 1e9, 1)}), flush=True)
    points = []
    for length in args.lengths:
        for impl in args.implementations:
            point = measure([sys.executable, __file__, "--child", impl, str(length)],
                            {"implementation": impl, "length": length}, args.repeats, args.timeout,
                            keys=("seconds", "peak_rss_mib", "ceiling_gflops"))
            if "error" not in point and impl.startswith("ours"):
                work = flops(impl, length)
                point["gflop"] = round(work / 1e9, 1)
                point["fraction_of_ceiling"] = round(work / point["seconds"] / (point["ceiling_gflops"] * 1e9), 3)
                point["fraction_of_run_ceiling"] = round(work / point["seconds"] / ceiling, 3)
            print(json.dumps(point), flush=True)
            if "error" not in point:
                points.append(point)
    if args.plot:
        plot(points, args.plot)


if __name__ == "__main__":
    main()
