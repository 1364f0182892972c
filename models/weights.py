"""Reading checkpoints (GGUF files of the llama architecture, Hugging Face checkpoint directories)
and writing Hugging Face ones (export.py).

Each reader returns (config, state_dict in our module names, tokenizer or None). Nothing here
unpickles: GGUF and safetensors are plain tensor formats, and a legacy `pytorch_model.bin` is
read only with `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""
import json
import re
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


def gguf_reader(path):
    """gguf.GGUFReader whose reads past the end of the file fail: gguf's own come back empty, so
    an array header that promises 2**40 items at the end of a file loops (and allocates) forever."""
    import gguf  # only needed for this format

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            arr = super()._get(offset, dtype, count, override_order)
            if len(arr) < int(count):
                raise ValueError(f"truncated at byte {offset}")
            return arr

    return Reader(str(path))


def read_gguf(path, dtype=torch.float32):
    import gguf

    reader = gguf_reader(path)
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
        if t.tensor_type.name.startswith("I") and not t.tensor_type.name.startswith("IQ"):  # I8 ... I64
            raise ValueError(f"tensor {t.name} is stored as {t.tensor_type.name}, not as floats or a float "
                             "quantisation: not a weight")
        a = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, (out, in) for matrices
        # a copy (GGUF data is read-only), in `dtype` at once: one float32 tensor at a time is alive
        return torch.from_numpy(np.array(a, dtype=np.float32)).to(dtype)

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
    if tokenizer is not None:
        tokenizer.template_from = str(path)
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


# the RoPE variants llama.py implements, and the parameters each reads besides θ
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_config(c):
    """(θ, scaling dict or None) of a config.json, read as transformers 5 reads it: transformers 4's
    `rope_scaling` before transformers 5's `rope_parameters`, a θ inside them before a top-level
    `rope_theta`, and a RoPE variant this model does not implement refused."""
    params = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"RoPE parameters per layer type ({', '.join(params)}) are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KEYS:
        raise ValueError(f"RoPE type {kind!r} is not implemented (only {', '.join(ROPE_KEYS)})")
    if params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor (RoPE on part of each head) is not implemented")
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    # transformers takes llama3's pretraining length from the top level, else the context length
    given = {"original_max_position_embeddings": c.get("original_max_position_embeddings",
                                                       c.get("max_position_embeddings")), **params}
    missing = [k for k in ROPE_KEYS[kind] if given.get(k) is None]
    if missing:
        raise ValueError(f"RoPE type {kind!r} needs {', '.join(missing)}")
    return theta, {"rope_type": kind, **{k: given[k] for k in ROPE_KEYS[kind]}}


def llama_config(c):
    """LlamaConfig of a llama / mistral / qwen2 config.json; what llama.py does not compute is refused."""
    n_heads = c["num_attention_heads"]
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act {c['hidden_act']!r} is not implemented (only silu)")
    if c.get("head_dim") is not None and c["head_dim"] != c["hidden_size"] // n_heads:
        raise ValueError(f"head_dim {c['head_dim']} is not hidden_size / num_attention_heads: not implemented")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError("attention_bias / mlp_bias (biases on every attention or MLP projection) are not implemented")
    theta, scaling = rope_config(c)
    context = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window") if c.get("use_sliding_window", c["model_type"] == "mistral") else None
    return LlamaConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads") or n_heads,
        hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=theta,
        # within its sliding window, windowed attention is full attention: the context stops there
        max_seq_len=min(context, window or context),
        tie_embeddings=c.get("tie_word_embeddings", False), rope_scaling=scaling,
        qkv_bias=c["model_type"] == "qwen2")


def gpt2_state_dict(raw, tied=True):
    """HF GPT-2 names and Conv1D (in, out) layouts -> ours: split c_attn, transpose matrices; the
    head's own weight only where it is not `tied` to wte."""
    sd = {}
    for k, v in raw.items():
        k = k.removeprefix("transformer.")
        if k.endswith(("attn.bias", "attn.masked_bias")) and not k.endswith("c_attn.bias"):
            continue  # causal-mask buffers of old checkpoints
        if k == "lm_head.weight":
            if not tied:
                sd[k] = v
            continue
        is_conv = k.endswith(".weight") and any(s in k for s in ("c_attn", "c_proj", "c_fc"))
        v = v.t().contiguous() if is_conv else v
        if ".attn.c_attn." in k:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                sd["transformer." + k.replace("c_attn", part)] = chunk.contiguous()
        else:
            sd["transformer." + k] = v
    return sd


def read_hf_dir(path, dtype=torch.float32):
    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    kind = c.get("model_type")
    raw = read_tensors(path)
    if kind == "gpt2":
        cfg = GPTConfig(vocab_size=c["vocab_size"], dim=c["n_embd"], n_layers=c["n_layer"],
                        n_heads=c["n_head"], max_seq_len=c.get("n_positions", 1024),
                        norm_eps=c.get("layer_norm_epsilon", 1e-5),
                        tie_embeddings=c.get("tie_word_embeddings", True))  # transformers' GPT-2 default
        sd = gpt2_state_dict(raw, cfg.tie_embeddings)
    elif kind in ("llama", "mistral", "qwen2"):
        cfg = llama_config(c)
        sd = {k: v for k, v in raw.items() if not k.endswith("rotary_emb.inv_freq")}
        if cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
    else:
        raise ValueError(f"{path}: model_type {kind!r} is not supported (gpt2, llama, mistral, qwen2)")
    ints = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if ints:
        raise ValueError(f"tensor {ints[0]} is stored as {sd[ints[0]].dtype}, not as floats: not a weight")
    tokenizer = tok.from_hf_dir(path)
    if tokenizer is None:
        warnings.warn(f"{path} ships no tokenizer files (tokenizer.json, vocab.json + merges.txt, "
                      "tokenizer.model): the model loads, the tokenizer is None", stacklevel=3)
    return cfg, {k: v.to(dtype) for k, v in sd.items()}, tokenizer


# ----------------------------------------------------------------------------- writing Hugging Face

def tied(model):
    """Whether the model's head is its embedding's very tensor: a merge into an adapted head unties it."""
    embed = model.transformer.wte if isinstance(model.cfg, GPTConfig) else model.model.embed_tokens
    return model.lm_head.weight is embed.weight


def hf_config(model):
    """config.json of the transformers model that matches `model` (an adapter-free one), its weights
    stored in the head's dtype: the head tied as `tied` says, RoPE in `rope_parameters` as
    transformers 5 writes it, and again in transformers 4's keys (`rope_theta`, `rope_scaling`),
    which 5 reads to the same values. q/k/v biases make it Qwen2."""
    cfg, tie = model.cfg, tied(model)
    # "bfloat16": transformers 5 reads "dtype", 4 "torch_dtype"
    name = str(model.lm_head.weight.dtype).removeprefix("torch.")
    if isinstance(cfg, GPTConfig):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": tie, "dtype": name, "torch_dtype": name}
    kind = "qwen2" if cfg.qkv_bias else "llama"
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    out = {"architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"], "model_type": kind,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
           "intermediate_size": cfg.hidden_dim, "hidden_act": "silu",
           "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "rope_theta": cfg.rope_theta,
           "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": tie,
           "dtype": name, "torch_dtype": name}
    if cfg.rope_scaling:
        out["rope_scaling"] = cfg.rope_scaling
    if kind == "llama":  # Qwen2's config has no head_dim: transformers derives it
        out.update(head_dim=cfg.dim // cfg.n_heads, attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


GPT2_QKV = re.compile(r"(transformer\.h\.\d+\.attn\.)([qkv])_proj")  # a third of HF's fused c_attn


def hf_state_dict(model):
    """The tensors of a plain (adapter-free) model under Hugging Face's names and layouts: the
    inverse of read_hf_dir. A tied head is left out, as save_pretrained leaves it out."""
    gpt2, tie = isinstance(model.cfg, GPTConfig), tied(model)
    sd = {k: v.detach() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    if not gpt2:
        return {k: v.contiguous() for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        m = GPT2_QKV.match(k)
        if m and m[2] != "q":
            continue  # joined with q below
        if m:
            kind = k.rpartition(".")[2]
            v = torch.cat([sd[f"{m[1]}{p}_proj.{kind}"] for p in "qkv"])  # (3C, C) or (3C,)
            k = f"{m[1]}c_attn.{kind}"
        if k.endswith(".weight") and any(s in k for s in ("c_attn", "c_proj", "c_fc")):
            v = v.t()  # Conv1D stores (in, out)
        out[k] = v.contiguous()
    return out
