"""The GPT-2 decoder: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, a head tied to the
embeddings (untied only where a merge gave the head an adapter's ΔW).

Names follow Hugging Face's GPT-2 (`transformer.h.3.attn.c_proj`, `mlp.c_fc`, ...), with one
change: the fused `c_attn` is split at load time into `attn.q_proj`, `attn.k_proj`, `attn.v_proj`,
because SARA and Mo-SARA need the spectrum of each projection on its own. HF's `Conv1D` stores
weights as (in, out); they are transposed once at load, so every layer here is a plain nn.Linear.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shared import KVCache, attend, generate, loss


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = True


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, cache):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attend(q, k, v, self.layer, cache)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.c_proj = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cache):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # logical target name -> module-name suffix; methods find their layers through this
    TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.c_proj",
               "fc": "mlp.c_fc", "proj": "mlp.c_proj"}

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.transformer.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.transformer.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.transformer.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init)

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
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def forward(self, idx, pos=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab)."""
        return self.lm_head(self.hidden(idx, pos, cache))

    def new_cache(self, batch, max_len):
        p = self.lm_head.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_heads, max_len,
                       self.cfg.dim // self.cfg.n_heads, p.dtype, p.device)

    loss = loss
    generate = generate
