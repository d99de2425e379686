"""Tokens per second of generation after a long context: ours cached, ours uncached, transformers cached.

Model: the "small" preset (4 layers, local + LSH, d_model 128) with random weights and max_seq_len
large enough; transformers' ReformerModelWithLMHead of the same shape (local + LSH layers, its own
cache). The prompt is random bytes of the context length; greedy decoding of --new tokens is timed
after the prompt has been processed and a few warm-up steps. Prints one JSON object per measurement.

    python benchmarks/generate.py --contexts 1024 8192 32768
"""

from __future__ import annotations

import argparse
import json
import time

import torch

WARM_UP = 4   # cached steps run before the clock starts, for both implementations


def ours(context: int, new: int, cached: bool) -> float:
    from reformer import ReformerConfig, ReformerLM
    from reformer.generate import Decoder

    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.preset("small", max_seq_len=context + new + WARM_UP)).eval()
    prompt = torch.randint(0, 256, (1, context))
    with torch.no_grad():
        if cached:
            decoder = Decoder(model)
            token = decoder.prefill(prompt).argmax(-1)
            for _ in range(WARM_UP):
                token = decoder.step(token).argmax(-1)
            start = time.perf_counter()
            for _ in range(new):
                token = decoder.step(token).argmax(-1)
        else:
            ids = prompt
            start = time.perf_counter()
            for _ in range(new):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return new / (time.perf_counter() - start)


def huggingface(context: int, new: int) -> float:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    torch.manual_seed(0)
    length = context + new + WARM_UP
    side = 2 ** ((length - 1).bit_length() // 2 + 1)
    cfg = ReformerConfig(vocab_size=256, hidden_size=128, num_attention_heads=4, attention_head_size=32,
                         feed_forward_size=512, attn_layers=["local", "lsh", "local", "lsh"], num_hashes=2,
                         lsh_attn_chunk_length=32, local_attn_chunk_length=32, is_decoder=True,
                         axial_pos_shape=[side, side], axial_pos_embds_dim=[64, 64],
                         max_position_embeddings=side * side, num_buckets=max(2, 2 * length // 32 // 2 * 2),
                         hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, pad_token_id=0,
                         eos_token_id=None)
    model = ReformerModelWithLMHead(cfg).eval()
    prompt = torch.randint(1, 256, (1, context))
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, token = out.past_buckets_states, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(WARM_UP):
            out = model(token, past_buckets_states=past, use_cache=True)
            past, token = out.past_buckets_states, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new):
            out = model(token, past_buckets_states=past, use_cache=True)
            past, token = out.past_buckets_states, out.logits[:, -1].argmax(-1, keepdim=True)
    return new / (time.perf_counter() - start)


def main() -> None:
    from reformer.ops import memory

    memory.offer_huge_pages_to_torch()   # as the reformer command does, before torch's first large block
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--new", type=int, default=64, help="tokens timed (cached runs)")
    parser.add_argument("--new-uncached", type=int, default=4, help="tokens timed (uncached runs)")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    for context in args.contexts:
        rows = [("ours-cached", lambda context=context: ours(context, args.new, True)),
                ("ours-uncached", lambda context=context: ours(context, args.new_uncached, False))]
        if not args.skip_hf:
            rows.append(("hf-cached", lambda context=context: huggingface(context, args.new)))
        for name, run in rows:
            try:
                print(json.dumps({"implementation": name, "context": context, "tokens_per_s": round(run(), 2)}),
                      flush=True)
            except Exception as error:  # noqa: BLE001 - a peer failing is a result to report
                print(json.dumps({"implementation": name, "context": context,
                                  "error": f"{type(error).__name__}: {error}"[:300]}), flush=True)


if __name__ == "__main__":
    main()
