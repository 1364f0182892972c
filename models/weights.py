"""Reading checkpoints: GGUF files (llama architecture) and Hugging Face checkpoint directories.

Each reader returns (config, state_dict in our module names, tokenizer or None). Nothing here
unpickles: GGUF and safetensors are plain tensor formats, and a legacy `pytorch_model.bin` is
read only with `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from . import tokenizer as tok
from .gpt import GPTConfig
from .llama import LlamaConfig

GGUF_NAMES = {  # GGUF block tensor -> our (= Hugging Face) name inside model.layers.{i}
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# ----------------------------------------------------------------------------- GGUF

def gguf_fields(reader):
    """GGUF metadata as plain Python values (token lists stay lists)."""
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # fields whose type this gguf version cannot decode are not needed
            continue
    return out


def unpermute(w, n_head):
    """Undo llama.cpp's converter, which interleaves the two rotary halves of each head."""
    out, *rest = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def read_gguf(path):
    import gguf  # only needed for this format

    reader = gguf.GGUFReader(str(path))
    fields = gguf_fields(reader)
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    get = lambda k, default=None: fields.get(f"llama.{k}", default)
    tensors = {t.name: t for t in reader.tensors}
    n_heads = get("attention.head_count")
    cfg = LlamaConfig(
        vocab_size=len(fields["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in fields
        else int(tensors["token_embd.weight"].shape[1]),
        dim=get("embedding_length"), n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads), hidden_dim=get("feed_forward_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get("rope.freq_base", 10000.0), max_seq_len=get("context_length", 2048),
        tie_embeddings="output.weight" not in tensors)

    def load(t):
        a = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, (out, in) for matrices
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: GGUF data is read-only

    sd = {}
    for name, t in tensors.items():
        if name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = load(t)
        elif name == "output_norm.weight":
            sd["model.norm.weight"] = load(t)
        elif name == "output.weight":
            sd["lm_head.weight"] = load(t)
        elif name.startswith("blk."):
            _, i, kind, _ = name.split(".")
            if kind not in GGUF_NAMES:
                continue  # e.g. precomputed rope frequencies
            w = load(t)
            if kind == "attn_q":
                w = unpermute(w, cfg.n_heads)
            elif kind == "attn_k":
                w = unpermute(w, cfg.n_kv_heads)
            sd[f"model.layers.{i}.{GGUF_NAMES[kind]}.weight"] = w
    tokenizer = tok.from_gguf(fields) if "tokenizer.ggml.tokens" in fields else None
    return cfg, sd, tokenizer


# ----------------------------------------------------------------------------- Hugging Face

def read_tensors(path):
    """All tensors of a HF checkpoint directory: single, sharded, or legacy .bin (weights only)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    if (path / "model.safetensors.index.json").exists():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        sd = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(path / shard))
        return sd
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def llama_config(c):
    rope_scaling = c.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in ("llama3", "default"):
        raise ValueError(f"rope_scaling {rope_scaling} is not supported (only 'llama3')")
    n_heads = c["num_attention_heads"]
    return LlamaConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads") or n_heads,
        hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 2048),
        tie_embeddings=c.get("tie_word_embeddings", False),
        rope_scaling=rope_scaling if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3" else None)


def gpt2_state_dict(raw):
    """HF GPT-2 names and Conv1D (in, out) layouts -> ours: split c_attn, transpose matrices."""
    sd = {}
    for k, v in raw.items():
        k = k.removeprefix("transformer.")
        if k.endswith(("attn.bias", "attn.masked_bias")) and not k.endswith("c_attn.bias"):
            continue  # causal-mask buffers of old checkpoints
        if k == "lm_head.weight":
            continue  # tied to wte
        is_conv = k.endswith(".weight") and any(s in k for s in ("c_attn", "c_proj", "c_fc"))
        v = v.t().contiguous() if is_conv else v
        if ".attn.c_attn." in k:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                sd["transformer." + k.replace("c_attn", part)] = chunk.contiguous()
        else:
            sd["transformer." + k] = v
    return sd


def read_hf_dir(path):
    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    kind = c.get("model_type")
    raw = read_tensors(path)
    if kind == "gpt2":
        cfg = GPTConfig(vocab_size=c["vocab_size"], dim=c["n_embd"], n_layers=c["n_layer"],
                        n_heads=c["n_head"], max_seq_len=c.get("n_positions", 1024),
                        norm_eps=c.get("layer_norm_epsilon", 1e-5))
        sd = gpt2_state_dict(raw)
    elif kind in ("llama", "mistral"):
        cfg = llama_config(c)
        sd = {k: v for k, v in raw.items() if not k.endswith("rotary_emb.inv_freq")}
        if cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
    else:
        raise ValueError(f"{path}: model_type {kind!r} is not supported (gpt2, llama, mistral)")
    tokenizer = tok.from_hf_dir(path)
    if tokenizer is None:
        warnings.warn(f"{path} ships no tokenizer files (tokenizer.json, vocab.json + merges.txt, "
                      "tokenizer.model): the model loads, the tokenizer is None", stacklevel=3)
    return cfg, {k: v.float() for k, v in sd.items()}, tokenizer
