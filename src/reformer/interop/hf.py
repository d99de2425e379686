"""Import and export of HuggingFace transformers Reformer checkpoints.

A transformers Reformer maps onto a ReformerLM with ``lsh_window="chunk"``: the same layout (duplicated
input, reversible blocks, LayerNorm(2d), vocabulary head) and the anchors' numerics (whole neighbouring
chunks with wrap-around, rotations drawn from ``hash_seed`` per head, padding in an extra bucket). Reading a
folder needs no transformers install: config.json and the weights are read directly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..config import ACTIVATIONS, ReformerConfig
from ..files import write_atomically
from ..nn.model import ReformerLM

# transformers parameter names -> ours; {i} is the layer index.
LAYER_NAMES = {
    "attention.layer_norm": "attention.norm",
    "attention.self_attention.query_key": "attention.attention.qk",
    "attention.self_attention.query": "attention.attention.q",
    "attention.self_attention.key": "attention.attention.k",
    "attention.self_attention.value": "attention.attention.v",
    "attention.output.dense": "attention.attention.out",
    "feed_forward.layer_norm": "feed_forward.norm",
    "feed_forward.dense.dense": "feed_forward.dense",
    "feed_forward.output.dense": "feed_forward.output",
}
GLOBAL_NAMES = {
    "reformer.embeddings.word_embeddings": "token_embedding",
    "reformer.embeddings.position_embeddings.embedding": "position_embedding.embedding",
    "reformer.encoder.layer_norm": "norm",
    "lm_head.decoder": "head",
}
# transformers ties lm_head.bias to lm_head.decoder.bias; folders saved by transformers 4.x hold the first only.
HEAD_BIAS_COPY, HEAD_BIAS = "lm_head.bias", "lm_head.decoder.bias"


def _hf_error(field: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"transformers config field {field!r} = {value!r} cannot be mapped: {allowed}")


def config_from_hf(hf: dict[str, Any]) -> ReformerConfig:
    """Translate a transformers ReformerConfig (as a dict) into ours. Unmappable values raise."""
    if hf.get("model_type", "reformer") != "reformer":
        raise _hf_error("model_type", "only 'reformer' checkpoints are supported", hf.get("model_type"))
    attn_layers = tuple(hf["attn_layers"])
    if hf.get("hidden_act", "relu") not in ACTIVATIONS:
        raise _hf_error("hidden_act", f"supported activations are {ACTIVATIONS}", hf.get("hidden_act"))
    num_buckets = hf.get("num_buckets")
    if "lsh" in attn_layers and num_buckets is None:
        raise _hf_error("num_buckets", "transformers derives it from the length of the first input it "
                        "sees; set num_buckets explicitly", None)
    if isinstance(num_buckets, list) and len(num_buckets) == 1:
        num_buckets = num_buckets[0]
    axial = bool(hf.get("axial_pos_embds", True))
    max_len = hf.get("max_position_embeddings", 4096)
    if axial:
        product = 1
        for n in hf["axial_pos_shape"]:
            product *= n
        max_len = min(max_len, product)
    lsh_chunk = hf.get("lsh_attn_chunk_length") or 64
    band = {}   # the band of a kind of layer the model has not may be None (transformers never reads it)
    for prefix, kind, before, after in (("lsh_num_chunks", "lsh", "n_chunks_before", "n_chunks_after"),
                                        ("local_num_chunks", "local", "local_n_chunks_before",
                                         "local_n_chunks_after")):
        for side, field, default in (("before", before, 1), ("after", after, 0)):
            value = hf.get(f"{prefix}_{side}", default)
            if value is None:
                if kind in attn_layers:
                    raise _hf_error(f"{prefix}_{side}", f"its {kind} layers need a number of chunks", None)
                value = default
            band[field] = value
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
        d_head=hf["attention_head_size"], n_layers=len(attn_layers), d_ff=hf["feed_forward_size"],
        activation=hf.get("hidden_act", "relu"), attn_layers=attn_layers,
        n_hashes=hf.get("num_hashes", 1),
        n_buckets=tuple(num_buckets) if isinstance(num_buckets, list) else num_buckets,
        chunk_length=lsh_chunk, local_chunk_length=hf.get("local_attn_chunk_length") or 64, **band,
        lsh_window="chunk", causal=bool(hf.get("is_decoder", False)),
        # transformers with hash_seed None draws new rotations from the global RNG on every call, so no
        # fixed seed reproduces it; 0 makes our evaluation deterministic.
        hash_seed=hf.get("hash_seed") or 0,
        ff_chunk_size=hf.get("chunk_size_feed_forward", 0) or 0,
        position_embedding="axial" if axial else "learned",
        axial_shape=tuple(hf["axial_pos_shape"]) if axial else None,
        axial_dims=tuple(hf["axial_pos_embds_dim"]) if axial else None,
        max_seq_len=max_len, dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("lsh_attention_probs_dropout_prob") or 0.0,
        local_attention_dropout=hf.get("local_attention_probs_dropout_prob") or 0.0,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02),
        axial_init_std=hf.get("axial_norm_std", 1.0),
    )
    if "lsh" not in attn_layers:
        fields["n_buckets"] = None
    try:
        return ReformerConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"transformers config cannot be mapped: {error}") from error


def config_to_hf(cfg: ReformerConfig) -> dict[str, Any]:
    """Our config as a transformers ReformerConfig dict. Only the anchors' semantics can be exported."""
    if cfg.lsh_window != "chunk":
        raise ValueError("ReformerConfig.lsh_window must be 'chunk' to export to transformers (its LSH "
                         f"attention has no 'bucket' window), got {cfg.lsh_window!r}")
    if "full" in cfg.attn_layers:
        raise ValueError("ReformerConfig.attn_layers must hold only 'lsh' and 'local' to export to "
                         f"transformers, got {cfg.attn_layers}")
    if cfg.position_embedding == "none":
        raise ValueError("ReformerConfig.position_embedding must be 'axial' or 'learned' to export to "
                         "transformers, got 'none'")
    if cfg.n_buckets == 1:
        raise ValueError("ReformerConfig.n_buckets must be even to export to transformers, got 1")
    axial = cfg.position_embedding == "axial"
    return {
        "model_type": "reformer",
        "architectures": ["ReformerModelWithLMHead" if cfg.causal else "ReformerForMaskedLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
        "attention_head_size": cfg.d_head, "num_hidden_layers": cfg.n_layers, "feed_forward_size": cfg.d_ff,
        "hidden_act": cfg.activation, "attn_layers": list(cfg.attn_layers), "num_hashes": cfg.n_hashes,
        "num_buckets": list(cfg.n_buckets) if isinstance(cfg.n_buckets, tuple) else cfg.n_buckets,
        "lsh_attn_chunk_length": cfg.chunk_length, "lsh_num_chunks_before": cfg.n_chunks_before,
        "lsh_num_chunks_after": cfg.n_chunks_after, "local_attn_chunk_length": cfg.local_chunk_length,
        "local_num_chunks_before": cfg.local_n_chunks_before,
        "local_num_chunks_after": cfg.local_n_chunks_after, "is_decoder": cfg.causal,
        # Feed-forward chunking saves memory and changes no number; transformers' demands lengths that the
        # chunk divides, so the export runs its feed-forward whole.
        "hash_seed": cfg.hash_seed, "chunk_size_feed_forward": 0,
        "axial_pos_embds": axial, "axial_pos_shape": list(cfg.axial_shape),
        "axial_pos_embds_dim": list(cfg.axial_dims), "max_position_embeddings": cfg.max_seq_len,
        "hidden_dropout_prob": cfg.dropout, "lsh_attention_probs_dropout_prob": cfg.attention_dropout,
        "local_attention_probs_dropout_prob": cfg.local_attention_dropout, "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std, "axial_norm_std": cfg.axial_init_std, "pad_token_id": 0,
        "eos_token_id": None, "tie_word_embeddings": False,
    }


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape the axial weights of) a transformers state dict. Unknown names raise."""
    ours = {}
    hf_state = dict(hf_state)
    if HEAD_BIAS_COPY in hf_state:
        copy = hf_state.pop(HEAD_BIAS_COPY)
        hf_state.setdefault(HEAD_BIAS, copy)
    for name, tensor in hf_state.items():
        ours[_rename(name)] = tensor.reshape(-1, tensor.shape[-1]) if ".position_embeddings.weights." in name \
            else tensor
    return ours


def _rename(name: str) -> str:
    base, _, kind = name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{kind}"
    match = re.fullmatch(r"reformer\.embeddings\.position_embeddings\.weights\.(\d+)", name)
    if match:
        return f"position_embedding.weights.{match.group(1)}"
    match = re.fullmatch(r"reformer\.encoder\.layers\.(\d+)\.(.+)", base)
    if match and match.group(2) in LAYER_NAMES:
        return f"stack.blocks.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{kind}"
    raise ValueError(f"transformers weight {name!r} has no counterpart in reformer")


def state_dict_to_hf(model) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names and shapes."""
    inverse_layer = {v: k for k, v in LAYER_NAMES.items()}
    inverse_global = {v: k for k, v in GLOBAL_NAMES.items()}
    out = {}
    n_axes = len(model.config.axial_shape)
    for name, tensor in model.state_dict().items():
        base, _, kind = name.rpartition(".")
        if base in inverse_global:
            out[f"{inverse_global[base]}.{kind}"] = tensor
        elif base == "position_embedding.weights":
            axis = int(kind)
            shape = [1] * n_axes
            shape[axis] = tensor.shape[0]
            out[f"reformer.embeddings.position_embeddings.weights.{kind}"] = tensor.reshape(*shape, -1)
        else:
            match = re.fullmatch(r"stack\.blocks\.(\d+)\.(.+)", base)
            out[f"reformer.encoder.layers.{match.group(1)}.{inverse_layer[match.group(2)]}.{kind}"] = tensor
    out[HEAD_BIAS_COPY] = out[HEAD_BIAS]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and weights (safetensors, sharded safetensors or pytorch_model.bin) of a folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a transformers checkpoint folder: {config_path} is missing")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise ValueError(f"{folder} holds no model.safetensors or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # noqa: BLE001 - any parse failure becomes one clear message
            raise ValueError(f"cannot read weights from {path}: {error}") from error
    return hf_config, state


def load_hf(source) -> ReformerLM:
    """A ReformerLM from a transformers folder or an in-memory transformers Reformer model."""
    if isinstance(source, (str, os.PathLike)):
        hf_config, hf_state = read_hf_folder(source)
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        hf_config, hf_state = source.config.to_dict(), source.state_dict()
    else:
        raise TypeError(f"source must be a folder path or a transformers Reformer model, got "
                        f"{type(source).__name__}")
    model = ReformerLM(config_from_hf(hf_config))
    state = state_dict_from_hf(hf_state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"the checkpoint lacks weights {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                         "was it saved from a model with a language-model head?")
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"checkpoint weight {name!r} has no place in a model of this config")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"checkpoint weight {name!r} has shape {tuple(tensor.shape)}, the config "
                             f"implies {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def save_hf(model, folder: str | os.PathLike) -> None:
    """Write config.json and model.safetensors that transformers' from_pretrained loads."""
    from safetensors.torch import save

    hf_config = config_to_hf(model.config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "model.safetensors", save(state_dict_to_hf(model), metadata={"format": "pt"}))
    write_atomically(folder / "config.json", json.dumps(hf_config, indent=2))
