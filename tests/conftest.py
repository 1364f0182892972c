"""Shared fixtures: tiny random models built in code (no downloads)."""
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (a red run can be reproduced); locally they vary.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)  # tiny models: a second thread costs more in overhead than it gains

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


@pytest.fixture(autouse=True, scope="session")
def real_matmul_seconds():
    """--dtype auto (the scripts' default) times matmuls: in the tests every dtype runs them alike,
    so auto takes float32 and no result depends on which dtype this CPU runs fastest. A test of the
    policy sets its own timings; this fixture's value is the real timing, for the test of it."""
    import models
    real = models.matmul_seconds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "matmul_seconds", lambda dtype, device: 1.0)
        yield real


@pytest.fixture(params=["llama", "gpt"])
def tiny_model(request):
    """A tiny random model of each family, frozen, in eval mode."""
    return tiny_llama() if request.param == "llama" else tiny_gpt()


def write_checkpoint(path, model):
    """Save a tiny model of ours as a Hugging Face LLaMA directory with a byte-level tokenizer.json."""
    import json

    from safetensors.torch import save_file

    from models.tokenizer import byte_decoder

    path.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.hidden_dim,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings}))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(path / "model.safetensors"))
    to_str = {b: ch for ch, b in byte_decoder().items()}
    vocab = {to_str[b]: b for b in range(256)}
    added = [{"id": 256 + i, "content": t, "special": True}
             for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])]
    (path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LLaMA saved as a HF checkpoint directory that models.load() reads, with a
    byte-level tokenizer (259 tokens) so train.py and eval.py run end to end in seconds."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt",
                            tiny_llama(vocab_size=259, max_seq_len=512, dim=32))


def drive(method, model, steps=3, lr=1e-2, seed=0):
    """A few training.train_step steps on random tokens (constant lr); returns after_step's figures per step."""
    import training

    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(method.param_groups(model, lr, 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    figures = []
    for step in range(1, steps + 1):
        x = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=g)
        figures.append(training.train_step(model, method, opt, sched, [(x[:, :-1], x[:, 1:])], step, steps)[1])
    model.eval()
    return figures


def interrupt_lora_run(monkeypatch, argv, step):
    """train.main(argv) for a LoRA run stopped by a KeyboardInterrupt at `step` (in after_step,
    before that step's checkpoint), as a Ctrl-C would stop it."""
    import methods
    import train
    lora = methods.get("lora")
    real = lora.after_step

    def stop(model, opt, at, total, **kw):
        if at == step:
            raise KeyboardInterrupt
        return real(model, opt, at, total, **kw)
    monkeypatch.setattr(lora, "after_step", stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(lora, "after_step", real)
