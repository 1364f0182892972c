"""A LLaMA-family decoder: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU.

Module names are Hugging Face's (`model.layers.3.self_attn.q_proj`, ...), so a HF state dict
loads with a plain copy and an adapter exports with a key prefix. Covers Llama 2/3, TinyLlama,
SmolLM/SmolLM2, Mistral, Qwen2 and the like: everything that differs between them is a Config field.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shared import KVCache, attend, generate, loss


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536  # SwiGLU inner width
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor", ...} or None
    qkv_bias: bool = False  # biases on q/k/v (Qwen2)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in float32 whatever the model's dtype, as transformers computes it
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def llama3_scaling(inv_freq, s):
    """Llama 3.1's long-context RoPE: slow frequencies divided by `factor`, a smooth ramp between."""
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    mixed = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    out = torch.where(wavelen > old / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    middle = (wavelen <= old / s["low_freq_factor"]) & (wavelen >= old / s["high_freq_factor"])
    return torch.where(middle, mixed, out)


def rope(x, cos, sin):
    """Rotate-half RoPE (HF layout: the two halves of each head are the pairs). x (B, nh, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_heads, self.n_kv = layer, cfg.n_heads, cfg.n_kv_heads
        self.hd = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        y = attend(rope(q, cos, sin), rope(k, cos, sin), v, self.layer, cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    # logical target name -> module-name suffix; methods find their layers through this
    TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init)

    def inv_freq(self, device):
        """RoPE's frequencies (hd/2,), float32 whatever the model's dtype: computed per call, so no
        buffer is ever cast to bf16 with the weights (positions need float32)."""
        hd = self.cfg.dim // self.cfg.n_heads
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd)
        s = self.cfg.rope_scaling
        if s is None:
            return inv_freq
        return inv_freq / s["factor"] if s["rope_type"] == "linear" else llama3_scaling(inv_freq, s)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, idx, pos=None, cache=None):
        """Final-norm hidden states (B, T, dim). pos (B, T) defaults to 0..T-1."""
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        freqs = pos[..., None].float() * self.inv_freq(idx.device)  # (B, T, hd/2)
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        x = self.model.embed_tokens(idx)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.len += T
        return self.model.norm(x)

    def forward(self, idx, pos=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab)."""
        return self.lm_head(self.hidden(idx, pos, cache))

    def new_cache(self, batch, max_len):
        p = self.lm_head.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len,
                       self.cfg.dim // self.cfg.n_heads, p.dtype, p.device)

    loss = loss
    generate = generate
