"""The attention layer and the 6-layer model on a CUDA device, bfloat16 autocast: time and peak memory.

layer: one causal layer, forward + backward (batch 1, d_model 256, 4 heads x 64, 4 rounds, chunk 64;
LayerNorm + attention + output projection), as benchmarks/attention.py measures it on the CPU:
    ours-flex     our LSHSelfAttention on FlexAttention (attention_backend="flex", compiled)
    ours-eager    the same layer on the eager core
    sdpa          full attention (scaled_dot_product_attention)
    flex-window   FlexAttention's causal sliding window of 2 x chunk keys (the same band without hashing)
    hf            transformers' ReformerAttention (LSHSelfAttention)
model: a training step (forward, loss, backward, Adam) of the 6-layer reversible byte LM of
benchmarks/model.py (d_model 256, 4 heads x 64, d_ff 1024, all LSH, 2 rounds, chunk 64):
    ours-flex, ours-eager, full (SDPA in every layer), hf (ReformerModelWithLMHead)

Every point runs in a fresh process after a warm-up step at the same length (compilation is not the
step's cost); the median of --repeats runs; peak memory is torch.cuda.max_memory_allocated over the
measured step. Prints one JSON object per point, and a log-log plot with --plot. Needs a CUDA device
(--device cpu runs the same code on the CPU, for a smoke test of the script only: flex has no backward
there).

    python benchmarks/gpu.py layer --lengths 4096 16384 65536 262144 --plot benchmarks/gpu-layer.png
    python benchmarks/gpu.py model --lengths 4096 16384 65536 262144 --plot benchmarks/gpu-model.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from reformer.config import transformers_n_buckets
from reformer.experiments.speed import measure

D_MODEL, HEADS, D_HEAD, CHUNK = 256, 4, 64, 64
LAYER_IMPLEMENTATIONS = ("ours-flex", "ours-eager", "sdpa", "flex-window", "hf")
MODEL_IMPLEMENTATIONS = ("ours-flex", "ours-eager", "full", "hf")


def _buckets(length: int):
    buckets = transformers_n_buckets(length, CHUNK)
    return list(buckets) if isinstance(buckets, tuple) else buckets


def build_layer(impl: str, length: int, device: str):
    """The layer as a function (batch, length, d_model) -> same, on ``device``."""
    import torch

    if impl.startswith("ours") or impl == "sdpa":
        from reformer import ReformerConfig
        from reformer.nn.reversible import AttentionBranch

        cfg = ReformerConfig(d_model=D_MODEL, n_heads=HEADS, d_head=D_HEAD, n_layers=1,
                             attn_layers="full" if impl == "sdpa" else "lsh", n_hashes=4, chunk_length=CHUNK,
                             n_buckets=transformers_n_buckets(length, CHUNK), max_seq_len=length,
                             position_embedding="none",
                             attention_backend="eager" if impl == "ours-eager" else "auto" if impl == "sdpa"
                             else "flex")
        return AttentionBranch(cfg, 0).to(device).train()
    if impl == "flex-window":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        attend = torch.compile(flex_attention)
        window = 2 * CHUNK
        norm = torch.nn.LayerNorm(D_MODEL).to(device)
        qkv = torch.nn.Linear(D_MODEL, 3 * HEADS * D_HEAD, bias=False).to(device)
        out = torch.nn.Linear(HEADS * D_HEAD, D_MODEL, bias=False).to(device)
        mask = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k < window), 1, 1, length, length,
                                 device=device, _compile=True)

        def layer(x):
            q, k, v = qkv(norm(x)).view(x.shape[0], length, 3, HEADS, D_HEAD).permute(2, 0, 3, 1, 4)
            return out(attend(q, k, v, block_mask=mask).transpose(1, 2).reshape(x.shape[0], length, -1))
        return layer
    if impl == "hf":
        from transformers import ReformerConfig as HFConfig
        from transformers.models.reformer.modeling_reformer import ReformerAttention

        cfg = HFConfig(hidden_size=D_MODEL, num_attention_heads=HEADS, attention_head_size=D_HEAD, attn_layers=["lsh"],
                       num_hashes=4, lsh_attn_chunk_length=CHUNK, num_buckets=_buckets(length), is_decoder=True,
                       max_position_embeddings=length, lsh_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        module = ReformerAttention(cfg).to(device).train()
        return lambda x: module(x).hidden_states
    raise ValueError(f"unknown layer implementation {impl!r}; choose from {LAYER_IMPLEMENTATIONS}")


def build_model(impl: str, length: int, device: str):
    """(model, loss of a batch) on ``device``."""
    if impl in ("ours-flex", "ours-eager", "full"):
        from reformer import ReformerConfig, ReformerLM

        cfg = ReformerConfig(d_model=256, n_heads=HEADS, d_head=D_HEAD, n_layers=6, d_ff=1024,
                             attn_layers="full" if impl == "full" else "lsh", n_hashes=2, chunk_length=CHUNK,
                             n_buckets=transformers_n_buckets(length, CHUNK), max_seq_len=length, ff_chunk_size=4096,
                             attention_backend="eager" if impl == "ours-eager" else "auto" if impl == "full"
                             else "flex")
        model = ReformerLM(cfg).to(device).train()
        return model, model.loss
    if impl == "hf":
        from transformers import ReformerConfig, ReformerModelWithLMHead

        side = 2 ** ((length.bit_length() - 1) // 2)
        cfg = ReformerConfig(vocab_size=256, hidden_size=256, num_attention_heads=HEADS, attention_head_size=D_HEAD,
                             feed_forward_size=1024, attn_layers=["lsh"] * 6, num_hashes=2,
                             lsh_attn_chunk_length=CHUNK, num_buckets=_buckets(length), is_decoder=True,
                             axial_pos_shape=[side, length // side], axial_pos_embds_dim=[128, 128],
                             max_position_embeddings=length, hidden_dropout_prob=0.0,
                             lsh_attention_probs_dropout_prob=0.0, chunk_size_feed_forward=min(4096, length),
                             pad_token_id=0, eos_token_id=None)
        model = ReformerModelWithLMHead(cfg).to(device).train()
        return model, lambda ids: model(ids, labels=ids).loss
    raise ValueError(f"unknown model implementation {impl!r}; choose from {MODEL_IMPLEMENTATIONS}")


def child(kind: str, impl: str, length: int, device: str) -> None:
    import torch

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    if kind == "layer":
        layer = build_layer(impl, length, device)

        def step():
            x = torch.randn(1, length, D_MODEL, device=device, requires_grad=True)
            layer(x).float().sum().backward()
    else:
        model, loss_of = build_model(impl, length, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            loss_of(torch.randint(0, 256, (1, length), device=device)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):   # a warm-up step (compilation), then the measured one
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    print(json.dumps({"kind": kind, "implementation": impl, "length": length, "seconds": seconds,
                      "peak_mib": peak, "device": torch.cuda.get_device_name() if cuda else "cpu"}))


def plot(points: list[dict], kind: str, path: str) -> None:
    from reformer.plotting import time_and_memory

    what = "one LSH layer, forward + backward" if kind == "layer" else "6-layer model, training step"
    time_and_memory(points, LAYER_IMPLEMENTATIONS if kind == "layer" else MODEL_IMPLEMENTATIONS, "peak_mib",
                    "seconds per step", "peak CUDA memory (MiB)",
                    f"{what}, bfloat16 autocast, {points[0]['device']}", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("layer", "model"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--implementations", nargs="+", help="default: all of the kind's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per point")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--plot", help="write a log-log PNG of time and memory against length")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.kind, args.child[0], int(args.child[1]), args.device)
        return
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "benchmarks/gpu.py: error: no CUDA device here (--device cpu for a smoke run)\n")
    implementations = args.implementations or list(LAYER_IMPLEMENTATIONS if args.kind == "layer"
                                                   else MODEL_IMPLEMENTATIONS)
    points = []
    for length in args.lengths:
        for impl in implementations:
            command = [sys.executable, __file__, args.kind, "--device", args.device, "--child", impl, str(length)]
            point = measure(command, {"kind": args.kind, "implementation": impl, "length": length}, args.repeats,
                            args.timeout, keys=("seconds", "peak_mib"))
            print(json.dumps(point), flush=True)
            if "error" not in point:
                points.append(point)
    if args.plot and points:
        plot(points, args.kind, args.plot)


if __name__ == "__main__":
    main()
