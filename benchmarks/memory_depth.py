"""Peak activation memory against depth: reversible layers keep it flat.

For 2, 6 and 12 layers at a fixed length, each point in a fresh process: build the model and the input,
note the resident memory, run one forward + backward, and report the peak resident memory above that
baseline (weights, gradients and the transient memory of one layer's recomputation included). Prints one
JSON object per point, then the 12-layer / 2-layer ratio for each mode.

The children run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed blocks of 64 KiB and
more to the system: otherwise its dynamic threshold keeps freed blocks cached, and peak RSS creeps up
with the number of allocations made (more layers, more recomputation) rather than with live memory.
--default-malloc measures with glibc's defaults instead.

    python benchmarks/memory_depth.py [--length 8192] [--repeats 3] [--default-malloc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from reformer.experiments.speed import measure, peak_rss_mib


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(depth: int, length: int, reversible: bool) -> None:
    import time

    import torch

    from reformer import ReformerConfig, ReformerLM

    torch.manual_seed(0)
    cfg = ReformerConfig(d_model=128, n_heads=4, d_head=32, d_ff=512, n_layers=depth, n_hashes=2,
                         chunk_length=64, max_seq_len=length, reversible=reversible, ff_chunk_size=1024)
    model = ReformerLM(cfg).train()
    x = torch.randint(0, 256, (1, length))
    base = rss_mib()
    start = time.perf_counter()
    model.loss(x).backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    print(json.dumps({"depth": depth, "reversible": reversible, "length": length,
                      "peak_above_baseline_mib": round(peak - base, 1), "seconds": round(seconds, 3)}))


def main() -> None:
    from reformer.ops import memory

    memory.offer_huge_pages_to_torch()   # as the reformer command does, before torch's first large block
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc defaults")
    parser.add_argument("--child", nargs=3, metavar=("DEPTH", "LENGTH", "REVERSIBLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), args.child[2] == "1")
        return
    env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    medians = {}
    for reversible in (True, False):
        for depth in (2, 6, 12):
            command = [sys.executable, __file__, "--child", str(depth), str(args.length), "1" if reversible else "0"]
            point = measure(command, {"malloc": "default" if args.default_malloc else "mmap_threshold_64KiB"},
                            args.repeats, timeout=3600, keys=("peak_above_baseline_mib", "seconds"), env=env)
            print(json.dumps(point), flush=True)
            if "error" in point:
                raise SystemExit(f"depth {depth} failed: {point['error']}")
            medians[reversible, depth] = point["peak_above_baseline_mib"]
    for reversible in (True, False):
        ratio = medians[reversible, 12] / medians[reversible, 2]
        print(json.dumps({"reversible": reversible, "ratio_12_over_2_layers": round(ratio, 3)}))

if __name__ == "__main__":
    main()
