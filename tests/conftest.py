"""Shared fixtures: tiny random models built in code (no downloads)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
               max_seq_len=64, rope_theta=10000.0, tie_embeddings=True)
    cfg.update(kw)
    return Llama(LlamaConfig(**cfg)).eval().requires_grad_(False)


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval().requires_grad_(False)


@pytest.fixture(params=["llama", "gpt"])
def tiny_model(request):
    """A tiny random model of each family, frozen, in eval mode."""
    return tiny_llama() if request.param == "llama" else tiny_gpt()
