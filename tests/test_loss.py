"""The models' loss: the LM head and cross-entropy in chunks of tokens (models.shared.HeadCrossEntropy)
give the loss and gradients of the whole-vocabulary computation, in float32 and bf16, without
holding a (tokens x vocab) float32 tensor."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bench
import methods
from conftest import tiny_gpt, tiny_llama
from models import shared

BF16 = torch.bfloat16


def whole_vocab_loss(model, idx, targets):
    """The loss computed in one piece: the (tokens x vocab) logits, log-softmax in float32."""
    h = model.hidden(idx)
    keep = targets != -100
    return F.cross_entropy(model.lm_head(h[keep]).float(), targets[keep])


def close(actual, expected, dtype, scale=None):
    """Equal to float32 rounding (in bf16, to bf16's) on `scale`, the size of the terms that make
    the values (default: the largest expected value)."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if scale is None:
        scale = expected.float().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * max(scale, 1e-3))


def loss_and_grads(fn, h, w, targets):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss, h.grad, w.grad


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), dim=st.integers(1, 12), vocab=st.integers(2, 60), chunk=st.integers(1, 50),
       dtype=st.sampled_from([torch.float32, BF16]), seed=st.integers(0, 2 ** 16))
def test_chunked_head_cross_entropy_is_cross_entropy(n, dim, vocab, chunk, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, dim, generator=g).to(dtype), (3 * torch.randn(vocab, dim, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    want = loss_and_grads(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t), h, w, targets)
    got = loss_and_grads(lambda h, w, t: shared.HeadCrossEntropy.apply(h, w, t, chunk), h, w, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    # the loss sums log-sum-exps of logits; d/dh sums (softmax - onehot) x w; d/dw sums it x h / n
    scales = (1 + (h.float() @ w.float().T).abs().max().item(), w.float().abs().max().item(),
              h.float().abs().max().item())
    for a, b, scale in zip(got, want, scales):
        close(a, b, dtype, scale)


def tiny(family, tie):
    if family == "gpt":  # GPT-2 always ties its head to the token embeddings
        return tiny_gpt()
    return tiny_llama(tie_embeddings=tie)


@settings(max_examples=30, deadline=None)
@given(family=st.sampled_from(["llama", "gpt"]), tie=st.booleans(), dtype=st.sampled_from([torch.float32, BF16]),
       chunk=st.integers(1, 30), train_head=st.booleans(), seed=st.integers(0, 2 ** 16),
       ignored=st.floats(0.0, 0.9))
def test_model_loss_and_every_gradient_match_the_whole_vocabulary_loss(family, tie, dtype, chunk, train_head, seed,
                                                                       ignored):
    """Ignored positions (-100) anywhere; the head frozen or trained, tied to the embeddings or not."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 97, (3, 9), generator=g)
    targets = torch.randint(0, 97, (3, 9), generator=g).masked_fill(torch.rand(3, 9, generator=g) < ignored, -100)
    targets[0, 0] = 5  # at least one target: the mean of none is the next test's
    results = []
    for fn in (whole_vocab_loss, shared.loss):
        model = tiny(family, tie).to(dtype)
        model.lm_head.requires_grad_(train_head)
        next(m for m in model.modules() if isinstance(m, torch.nn.Embedding)).requires_grad_(True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(shared, "CHUNK", chunk)
            loss = fn(model, idx, targets)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want, want_grads), (got, got_grads) = results
    close(got, want, dtype)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in want_grads:
        close(got_grads[name], want_grads[name], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_no_target_gives_what_the_whole_vocabulary_loss_gives(dtype):
    """Every position ignored: NaN, as the mean over no positions, and zero gradients."""
    idx, targets = torch.randint(0, 97, (2, 5)), torch.full((2, 5), -100)
    results = []
    for fn in (whole_vocab_loss, shared.loss):
        model = tiny_llama().to(dtype)
        model.model.embed_tokens.requires_grad_(True)
        loss = fn(model, idx, targets)
        loss.backward()
        results.append((loss, model.model.embed_tokens.weight.grad))
    (want, want_grad), (got, got_grad) = results
    assert want.isnan() and got.isnan()
    assert torch.equal(got_grad, want_grad) and not got_grad.any()


def test_an_adapter_on_the_head_runs_through_its_own_forward():
    """A wrapped lm_head is not its weight alone: the loss is computed through the wrapper, so its
    ΔW shows in the loss and its factors get gradients."""
    lora = methods.get("lora")
    model = tiny_llama()
    idx, targets = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 7))
    plain = shared.loss(model, idx, targets)
    model.lm_head = lora.LoRALinear(model.lm_head, lora.Config(r=2, dropout=0.0))
    torch.nn.init.normal_(model.lm_head.lora_B)  # ΔW != 0
    adapted = shared.loss(model, idx, targets)
    adapted.backward()
    torch.testing.assert_close(adapted, whole_vocab_loss(model, idx, targets))
    assert not torch.isclose(adapted, plain)
    assert model.lm_head.lora_A.grad.abs().sum() > 0 and model.lm_head.lora_B.grad.abs().sum() > 0


def test_the_loss_never_holds_a_tokens_by_vocab_float32_tensor(monkeypatch):
    """Allocation-based: the whole-vocabulary loss holds the float32 logits and their log-softmax
    at once; the chunked one, at most a few chunks' worth."""
    vocab, tokens, chunk = 4096, 1024, 32
    model = tiny_llama(vocab_size=vocab)
    model.model.embed_tokens.requires_grad_(True)  # the tied head trains too: its gradient is (vocab x dim)
    idx = torch.randint(0, vocab, (16, tokens // 16))
    targets = torch.randint(0, vocab, (16, tokens // 16))
    monkeypatch.setattr(shared, "CHUNK", chunk)
    full, cpu = tokens * vocab * 4, torch.device("cpu")  # bytes of one (tokens x vocab) float32 tensor
    assert bench.transient_peak(lambda: whole_vocab_loss(model, idx, targets).backward(), cpu) > 2 * full
    model.zero_grad()
    peak = bench.transient_peak(lambda: shared.loss(model, idx, targets).backward(), cpu)
    assert peak < full / 2  # the whole model's activations included
