"""Writers of real checkpoint formats for the model and tokenizer tests (no downloads).

Everything here is written independently of models/: the GPT-2 byte<->unicode map, llama.cpp's
q/k permutation, the Hugging Face GPT-2 layout and the GGUF metadata keys follow the reference
converters, so a loader that merely mirrors its own writer cannot pass by accident.
"""
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402


# ----------------------------------------------------------------------------- vocabulary

def bytes_to_unicode():
    """GPT-2's encoder.py map: byte -> printable character (as in openai/gpt-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


BYTE_ENC = bytes_to_unicode()
# a few merges in GPT-2's printable form (Ġ is the space byte); each joins two existing tokens
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "Ġ w", "Ġw he", "1 2"]
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def byte_vocab():
    """(tokens, token_types, merges) of a tiny byte-level BPE vocabulary, GGUF style:
    256 byte tokens in GPT-2's order, one token per merge (ids follow merge order), specials last."""
    tokens = [BYTE_ENC[b] for b in BYTE_ENC]  # dict order = GPT-2's id order of the byte tokens
    for m in MERGES:
        a, b = m.split(" ")
        assert a in tokens and b in tokens, m
        tokens.append(a + b)
    types = [1] * len(tokens) + [3] * len(SPECIALS)  # 1 normal, 3 control
    return tokens + SPECIALS, types, list(MERGES)


VOCAB_SIZE = len(byte_vocab()[0])


# ----------------------------------------------------------------------------- GGUF

def permute(w, n_head, n_head_kv=None):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (numpy, (out, in))."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def inverse_permute(w, n_head):
    """The inverse of `permute`, written here for the dequantised reference (numpy)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_tensors(model):
    """GGUF name -> float32 numpy array (llama.cpp layout: q/k permuted) of a Llama module."""
    cfg = model.cfg
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in GGUF_BLOCK.items():
            w = sd[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                w = permute(w, cfg.n_heads, cfg.n_heads)
            elif theirs == "attn_k":
                w = permute(w, cfg.n_heads, cfg.n_kv_heads)
            out[f"blk.{i}.{theirs}.weight"] = np.ascontiguousarray(w)
    return out


def write_gguf(path, model, qtype=None, vocab=None, pre="gpt2", extra_tensors=None, scores=None):
    """Write `model` (a Llama) as a llama-architecture GGUF; 2-D tensors in `qtype` (None: F32).
    vocab: (tokens, token types, merges) of byte-level BPE, or with `scores` (one per token) of
    SentencePiece BPE, as llama.cpp writes Llama 2's: tokenizer model "llama", scores, no merges,
    <s> and </s> the bos and eos.

    Returns {name: (stored numpy data, GGMLQuantizationType)} of what went into the file.
    """
    import gguf

    cfg = model.cfg
    tokens, types, merges = vocab or byte_vocab()
    assert len(tokens) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.dim // cfg.n_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
    if scores is None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        w.add_eos_token_id(tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else 0)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_bos_token_id(tokens.index("<s>"))
        w.add_eos_token_id(tokens.index("</s>"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    written = {}
    tensors = gguf_tensors(model)
    tensors.update(extra_tensors or {})
    for name, a in tensors.items():
        if qtype is not None and a.ndim == 2:
            data, t = gguf.quants.quantize(a, qtype), qtype
            w.add_tensor(name, data, raw_dtype=t)
        else:
            data, t = a.astype(np.float32), gguf.GGMLQuantizationType.F32
            w.add_tensor(name, data)
        written[name] = (data, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# ----------------------------------------------------------------------------- Hugging Face

def llama_hf_config(cfg):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu", "torch_dtype": "float32"}


def llama_hf_tensors(model, inv_freq=False):
    """HF LlamaForCausalLM state dict (own storage per tensor; no lm_head when tied)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del sd["lm_head.weight"]  # save_pretrained drops the shared copy
    if inv_freq:  # old checkpoints carry the rotary buffer; it must be ignored
        for i in range(model.cfg.n_layers):
            sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = model.inv_freq("cpu").clone()
    return sd


def write_safetensors_dir(path, config, tensors, shards=1):
    """config.json + model.safetensors, or `shards` files with model.safetensors.index.json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def write_bin_dir(path, config, tensors):
    """config.json + pytorch_model.bin written with torch.save of a plain state dict."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(tensors, path / "pytorch_model.bin")
    return path


def gpt2_hf_config(vocab_size, dim, n_layers, n_heads, n_positions, eps=1e-5):
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
            "n_embd": dim, "n_layer": n_layers, "n_head": n_heads, "n_positions": n_positions,
            "n_ctx": n_positions, "layer_norm_epsilon": eps, "activation_function": "gelu_new"}


def gpt2_hf_tensors(seed, vocab_size=97, dim=32, n_layers=2, n_positions=64):
    """Random tensors in the layout of the hub's gpt2 model.safetensors: no `transformer.` prefix,
    Conv1D weights (in, out), fused c_attn (C, 3C) + (3C,), and the `h.N.attn.bias` mask buffers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.3: torch.randn(*s, generator=g) * std
    C = dim
    t = {"wte.weight": r(vocab_size, C, std=0.5), "wpe.weight": r(n_positions, C, std=0.5),
         "ln_f.weight": 1 + r(C, std=0.2), "ln_f.bias": r(C, std=0.2)}
    for i in range(n_layers):
        p = f"h.{i}."
        t.update({
            p + "ln_1.weight": 1 + r(C, std=0.2), p + "ln_1.bias": r(C, std=0.2),
            p + "attn.bias": torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions),
            p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
            p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
            p + "ln_2.weight": 1 + r(C, std=0.2), p + "ln_2.bias": r(C, std=0.2),
            p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
            p + "mlp.c_proj.weight": r(4 * C, C, std=0.15), p + "mlp.c_proj.bias": r(C),
        })
    return t


def gpt2_reference_logits(t, idx, n_heads, eps=1e-5):
    """GPT-2's forward written directly on the HF tensors, in float64 (idx: (B, T) LongTensor)."""
    t = {k: v.double() for k, v in t.items()}
    B, T = idx.shape
    C = t["wte.weight"].shape[1]
    hd = C // n_heads

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b

    def gelu(x):  # gelu_new
        return 0.5 * x * (1 + torch.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    x = t["wte.weight"][idx] + t["wpe.weight"][torch.arange(T)][None]
    n = 0
    while f"h.{n}.ln_1.weight" in t:
        p = f"h.{n}."
        h = ln(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"])
        qkv = h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]  # Conv1D: x @ W(in, out) + b
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, n_heads, hd).transpose(1, 2) for j in range(3))
        att = q @ k.transpose(-1, -2) / np.sqrt(hd)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = ln(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"])
        x = x + gelu(h @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]) @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
        n += 1
    x = ln(x, t["ln_f.weight"], t["ln_f.bias"])
    return x @ t["wte.weight"].T


# ----------------------------------------------------------------------------- the default model

class NetworkUsed(AssertionError):
    pass


@functools.lru_cache(maxsize=1)
def default_model():
    """models.load() once per test process (~10 s); both test files share it.

    Loaded with sockets disabled: any attempt to reach the network fails the load."""
    import socket

    def refuse(*args, **kwargs):
        raise NetworkUsed("models.load() tried to use the network")

    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo
    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.create_connection = socket.getaddrinfo = refuse
    try:
        return models.load()
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved
