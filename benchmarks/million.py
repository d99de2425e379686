"""A training step at a million tokens (2^20), batch 1, on one CPU machine, against transformers.

The model is benchmarks/model.py's 6-layer reversible LSH byte LM (d_model 256, 4 heads x 64, d_ff 1024,
2 rounds, chunk 64, buckets by transformers' rule), with the model's own settings for long sequences:
the feed-forward in chunks of --ff-chunk positions (its (length, d_ff) hidden layer never whole) and
the vocabulary head and loss in chunks of --head-chunk (no (length, vocab) logits). One step: forward,
loss, backward, Adam. transformers' ReformerModelWithLMHead of the same shape (its own feed-forward
chunking at --ff-chunk) runs the same step for comparison.

Each implementation runs in a fresh process. A watchdog reads the child's resident memory every 0.2 s
and stops it once it passes --limit-gib, so a model that does not fit is reported with the memory at
which it was stopped and when, not as a machine brought down by the kernel's OOM killer. The step's
phases are printed as they end (a step at 2^20 takes minutes).

    python benchmarks/million.py                           # both, 2^20 tokens, 16 GiB limit
    python benchmarks/million.py --length 262144 --implementations ours
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

LAYERS, CHUNK, HASHES = 6, 64, 2


def build(impl: str, length: int, ff_chunk: int, head_chunk: int):
    """(model, loss of a (1, length) batch)."""
    from reformer.config import ReformerConfig, transformers_n_buckets

    buckets = transformers_n_buckets(length, CHUNK)
    if impl == "ours":
        from reformer.nn.model import ReformerLM

        cfg = ReformerConfig(d_model=256, n_heads=4, d_head=64, n_layers=LAYERS, d_ff=1024, attn_layers="lsh",
                             n_hashes=HASHES, chunk_length=CHUNK, n_buckets=buckets, max_seq_len=length,
                             ff_chunk_size=ff_chunk, head_chunk_size=head_chunk)
        model = ReformerLM(cfg).train()
        return model, model.loss
    from transformers import ReformerConfig as HFConfig
    from transformers import ReformerModelWithLMHead

    side = 2 ** ((length.bit_length() - 1) // 2)
    cfg = HFConfig(vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64,
                   feed_forward_size=1024, attn_layers=["lsh"] * LAYERS, num_hashes=HASHES,
                   lsh_attn_chunk_length=CHUNK, num_buckets=list(buckets) if isinstance(buckets, tuple) else buckets,
                   is_decoder=True, axial_pos_shape=[side, length // side], axial_pos_embds_dim=[128, 128],
                   max_position_embeddings=length, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                   chunk_size_feed_forward=ff_chunk, pad_token_id=0, eos_token_id=None)
    model = ReformerModelWithLMHead(cfg).train()
    return model, lambda ids: model(ids, labels=ids).loss


def child(impl: str, length: int, ff_chunk: int, head_chunk: int) -> None:
    """One step, phases and the result as JSON lines on stdout."""
    import torch

    from reformer.experiments.speed import peak_rss_mib

    torch.manual_seed(0)
    model, loss_of = build(impl, length, ff_chunk, head_chunk)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (1, length))
    say = lambda phase, **more: print(json.dumps({"phase": phase, "seconds": time.perf_counter() - start,  # noqa: E731
                                                  "peak_rss_mib": peak_rss_mib(), **more}), flush=True)
    start = time.perf_counter()
    loss = loss_of(ids)
    say("forward and loss", loss=float(loss))
    loss.backward()
    backward_done = time.perf_counter() - start
    say("backward")
    grads_finite = all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
    tick = time.perf_counter()
    optimizer.step()
    adam = time.perf_counter() - tick
    # The step's time: forward, loss, backward and Adam, not the finiteness check between them.
    say("done", loss=float(loss), grads_finite=grads_finite, step_seconds=backward_done + adam)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(impl: str, length: int, ff_chunk: int, head_chunk: int, limit_gib: float, timeout: float) -> dict:
    """The child's last JSON line, or what stopped it (memory limit, timeout, error) and when."""
    command = [sys.executable, __file__, "child", impl, str(length), str(ff_chunk), str(head_chunk)]
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []

    def read_phases() -> None:   # printed as they come: a step at 2^20 takes minutes
        for line in proc.stdout:
            if line.startswith("{"):
                lines.append(json.loads(line))
                phase = lines[-1]
                print(f"  {impl}: {phase['phase']} at {phase['seconds']:.1f} s, peak "
                      f"{phase['peak_rss_mib'] / 1024:.2f} GiB", file=sys.stderr, flush=True)

    reader = threading.Thread(target=read_phases, daemon=True)
    reader.start()
    seen, stopped = 0.0, None
    while proc.poll() is None:
        try:
            seen = max(seen, rss_mib(proc.pid))
        except OSError:
            break
        elapsed = time.perf_counter() - began
        if seen > limit_gib * 1024:
            stopped = (f"stopped at {seen / 1024:.1f} GiB resident, over the {limit_gib:g} GiB limit, "
                       f"after {elapsed:.0f} s")
        elif elapsed > timeout:
            stopped = f"stopped after {timeout:g} s"
        if stopped:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    reader.join()
    err = proc.stderr.read()
    point = {"implementation": impl, "length": length, "ff_chunk": ff_chunk, "head_chunk": head_chunk,
             "limit_gib": limit_gib, "phases": lines}
    if stopped:
        return {**point, "error": stopped, "watched_peak_rss_mib": seen}
    if proc.returncode != 0 or not lines or lines[-1]["phase"] != "done":
        return {**point, "error": " ".join(err.strip().splitlines()[-1:]) or f"exit {proc.returncode}",
                "watched_peak_rss_mib": seen}
    return {**point, **lines[-1], "watched_peak_rss_mib": seen}


def main() -> None:
    from reformer.ops import memory

    memory.offer_huge_pages_to_torch()   # as the reformer command does; children inherit it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "child"))
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=2 ** 20)
    parser.add_argument("--implementations", nargs="+", default=["ours", "hf"], choices=("ours", "hf"))
    parser.add_argument("--ff-chunk", type=int, default=4096, help="feed-forward positions per chunk")
    parser.add_argument("--head-chunk", type=int, default=8192, help="head and loss positions per chunk (ours)")
    parser.add_argument("--limit-gib", type=float, default=16.0, help="resident memory at which a run is stopped")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    if args.mode == "child":
        impl, length, ff_chunk, head_chunk = args.args
        child(impl, int(length), int(ff_chunk), int(head_chunk))
        return
    for impl in args.implementations:
        print(json.dumps(run(impl, args.length, args.ff_chunk, args.head_chunk, args.limit_gib, args.timeout)),
              flush=True)


if __name__ == "__main__":
    main()
