"""What the LLaMA and GPT-2 decoders share: attention over a KV cache, the loss, generate().

The loss never holds a (tokens x vocab) float32 tensor: HeadCrossEntropy computes the LM head and
the cross-entropy CHUNK tokens at a time and recomputes each chunk's logits in backward.

Batched generation left-pads the prompts. Every row then carries its own positions
(`pos`, for RoPE or learned position embeddings) and a mask of which cache slots hold real
tokens (`valid`), so a padded batch gives the same tokens as one prompt at a time.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# tokens per slice of the LM head in the loss: 256 x 49,152 float32 logits are 48 MiB. The largest
# power of two that keeps the default model's step within the memory goals at batch 8 x 128 (512:
# bf16 at 0.64x float32); smaller slices cost time (docs/precision.md)
CHUNK = 256


class KVCache:
    """Keys and values of every layer, preallocated: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # real tokens
        self.len = 0  # slots filled so far, the same for every row


def attend(q, k, v, layer, cache=None):
    """Causal attention. q (B, nh, T, hd); k, v (B, nkv, T, hd); GQA when nkv < nh."""
    gqa = q.size(1) != k.size(1)
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    T, t0 = q.size(2), cache.len
    cache.k[layer][:, :, t0:t0 + T] = k
    cache.v[layer][:, :, t0:t0 + T] = v
    k, v = cache.k[layer][:, :, :t0 + T], cache.v[layer][:, :, :t0 + T]
    # query i (at slot t0+i) sees slot j when j <= t0+i and slot j holds a real token
    causal = torch.ones(T, t0 + T, dtype=torch.bool, device=q.device).tril(t0)
    mask = causal[None, None] & cache.valid[:, None, None, :t0 + T]  # (B, 1, T, t0+T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class HeadCrossEntropy(torch.autograd.Function):
    """F.cross_entropy((h @ w.T).float(), targets), the mean over every row, computed `chunk` rows
    at a time. Logits in w's dtype, log-sum-exp and loss in float32. Backward keeps h, w and each
    row's log-sum-exp, not the logits: it recomputes them per chunk (one more LM-head matmul).

    h (N, dim), w (vocab, dim), targets (N,) in [0, vocab). N = 0 gives NaN, as the mean of nothing."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk):
        lse = torch.empty(len(h), dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, len(h), chunk):
            logits = (h[s:s + chunk] @ w.T).float()  # (chunk, vocab)
            lse[s:s + chunk] = logits.logsumexp(-1)
            total += (lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None])[:, 0]).sum()
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk = chunk
        return total / len(h)

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None  # summed over chunks
        for s in range(0, len(h), ctx.chunk):
            hc, tc = h[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            dlogits = (hc @ w.T).float().sub_(lse[s:s + ctx.chunk, None]).exp_()  # softmax (chunk, vocab)
            dlogits[torch.arange(len(tc), device=tc.device), tc] -= 1
            dlogits = dlogits.mul_(grad / len(h)).to(h.dtype)  # as autograd casts the float32 gradient back
            if want_h:
                grad_h[s:s + ctx.chunk] = dlogits @ w
            if want_w:
                grad_w += (dlogits.T @ hc).float()
        return grad_h, grad_w.to(w.dtype) if want_w else None, None, None


def loss(model, idx, targets):
    """Mean cross-entropy over positions whose target is not -100 (the head runs only there),
    log-softmax in float32 whatever the model's dtype.

    A head that is a plain nn.Linear without bias (tied to the embeddings or not, frozen or
    trained) goes through HeadCrossEntropy. Any other head, such as an adapter's wrapper around
    lm_head, runs whole through its own forward: its weight alone is not what it computes."""
    h = model.hidden(idx)
    keep = targets != -100
    head = model.lm_head
    if type(head) is nn.Linear and head.bias is None:
        return HeadCrossEntropy.apply(h[keep], head.weight, targets[keep], CHUNK)
    return F.cross_entropy(head(h[keep]).float(), targets[keep])


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, stop_tokens=(), on_token=None):
    """Continue each prompt (a list of token ids); returns the new ids of each, stop token excluded.

    temperature 0 is greedy decoding. Rows stop independently at any of `stop_tokens`.
    on_token(row, id), when given, sees each new id as soon as it is chosen (streaming).
    """
    device = model.lm_head.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    if L + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {L} tokens plus {max_new_tokens} new ones exceeds the model's "
                         f"context of {model.cfg.max_seq_len} tokens: shorten it or lower max_new_tokens")
    idx = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):  # left padding: every row's last prompt token is at L-1
        idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, L - len(p):] = True
    pos = (valid.cumsum(1) - 1).clamp(min=0)  # (B, L) each row counts from 0
    cache = model.new_cache(B, L + max_new_tokens)
    cache.valid[:, :L] = valid
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    logits = model.lm_head(model.hidden(idx, pos, cache)[:, -1])  # the head only where it is read
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_k)  # (B,)
        done |= torch.isin(tok, stop)
        for b in (~done).nonzero().flatten().tolist():
            out[b].append(tok[b].item())
            if on_token is not None:
                on_token(b, out[b][-1])
        if done.all():
            break
        pos = pos[:, -1:] + 1
        cache.valid[:, cache.len] = True
        logits = model(tok[:, None], pos=pos, cache=cache)[:, -1]
    return out


def sample(logits, temperature, top_k):
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
