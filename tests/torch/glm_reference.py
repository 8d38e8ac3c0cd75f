"""Independent PyTorch implementation of the ChatGLM-6B (v1) forward pass.

Used only on the GPU machine to produce golden logits for our C++ tests. It follows
docs/chatglm-format.md (the spec): alpha = sqrt(56) for every model size, 2D rotary with
rotate_half over each half of the head, per-head interleaved q/k/v, GLM prefix mask, and the
half-precision rounding of the rotary inverse frequencies that the released model applies.
"""
import math

import torch


def glm_layout(ids, cfg):
    """Position ids, block position ids and context length of one sequence (spec section 2)."""
    bos, gmask, mask = cfg["bos_token_id"], cfg["gmask_token_id"], cfg["mask_token_id"]
    n = len(ids)
    if bos not in ids:
        return list(range(n)), [0] * n, n
    ctx = ids.index(bos)
    mask_token = gmask if gmask in ids else mask
    mpos = ids.index(mask_token)
    pos = [t if t < ctx else mpos for t in range(n)]
    block = [0 if t < ctx else t - ctx + 1 for t in range(n)]
    return pos, block, ctx


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, positions, rot_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    inv_freq = inv_freq.to(torch.float16).to(torch.float32).to(positions.device)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [n, rot_dim]
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    return x * cos + rotate_half(x) * sin


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def forward(weights, cfg, ids, lora=None):
    """Logits [n, vocab] in float32 for one sequence of token ids.

    lora: optional {(layer, module): (A, B, scale)} with module one of query_key_value, dense,
    dense_h_to_4h, dense_4h_to_h; the adapted linear then adds scale * x A^T B^T (no dropout).
    The result is differentiable with respect to the A and B tensors.
    """
    w = {k: v.to(torch.float32) for k, v in weights.items()}
    lora = lora or {}

    def linear(x, layer, module, weight, bias):
        y = x @ weight.T + bias
        if (layer, module) in lora:
            a, b, scale = lora[(layer, module)]
            y = y + scale * (x @ a.T) @ b.T
        return y

    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = H // nh
    eps = cfg["layernorm_epsilon"]
    alpha = math.sqrt(2 * 28)
    pos, block, ctx = glm_layout(ids, cfg)
    n = len(ids)
    dev = w["transformer.word_embeddings.weight"].device
    pos_t, block_t = torch.tensor(pos, device=dev), torch.tensor(block, device=dev)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))
    allowed[:, :ctx] = True
    x = w["transformer.word_embeddings.weight"][torch.tensor(ids, device=dev)]
    for i in range(cfg["num_layers"]):
        p = f"transformer.layers.{i}."
        a = torch.nn.functional.layer_norm(x, (H,), w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
        qkv = linear(a, i, "query_key_value", w[p + "attention.query_key_value.weight"],
                     w[p + "attention.query_key_value.bias"])
        qkv = qkv.view(n, nh, 3 * hd)
        q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
        half = hd // 2
        q = torch.cat((apply_rotary(q[..., :half], pos_t, half), apply_rotary(q[..., half:], block_t, half)), -1)
        k = torch.cat((apply_rotary(k[..., :half], pos_t, half), apply_rotary(k[..., half:], block_t, half)), -1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[None], -10000.0)
        probs = torch.softmax(scores, dim=-1)
        ctx_out = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, H)
        o = linear(ctx_out, i, "dense", w[p + "attention.dense.weight"], w[p + "attention.dense.bias"])
        h = a * alpha + o
        m = torch.nn.functional.layer_norm(h, (H,), w[p + "post_attention_layernorm.weight"],
                                           w[p + "post_attention_layernorm.bias"], eps)
        y = gelu_tanh(linear(m, i, "dense_h_to_4h", w[p + "mlp.dense_h_to_4h.weight"],
                             w[p + "mlp.dense_h_to_4h.bias"]))
        y = linear(y, i, "dense_4h_to_h", w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"])
        x = m * alpha + y
    x = torch.nn.functional.layer_norm(x, (H,), w["transformer.final_layernorm.weight"],
                                       w["transformer.final_layernorm.bias"], eps)
    head = w.get("lm_head.weight", w["transformer.word_embeddings.weight"])
    return x @ head.T


def random_weights(cfg, seed, tie_lm_head=False):
    """Random weights with the real HF names and shapes, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["inner_hidden_size"], cfg["vocab_size"]

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    w = {"transformer.word_embeddings.weight": rnd(V, H, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            w[p + ln + ".weight"] = 1.0 + rnd(H, scale=0.1)
            w[p + ln + ".bias"] = rnd(H, scale=0.1)
        w[p + "attention.query_key_value.weight"] = rnd(3 * H, H, scale=H ** -0.5)
        w[p + "attention.query_key_value.bias"] = rnd(3 * H, scale=0.1)
        w[p + "attention.dense.weight"] = rnd(H, H, scale=H ** -0.5)
        w[p + "attention.dense.bias"] = rnd(H, scale=0.1)
        w[p + "mlp.dense_h_to_4h.weight"] = rnd(I, H, scale=H ** -0.5)
        w[p + "mlp.dense_h_to_4h.bias"] = rnd(I, scale=0.1)
        w[p + "mlp.dense_4h_to_h.weight"] = rnd(H, I, scale=I ** -0.5)
        w[p + "mlp.dense_4h_to_h.bias"] = rnd(H, scale=0.1)
    w["transformer.final_layernorm.weight"] = 1.0 + rnd(H, scale=0.1)
    w["transformer.final_layernorm.bias"] = rnd(H, scale=0.1)
    if not tie_lm_head:
        w["lm_head.weight"] = rnd(V, H, scale=H ** -0.5)
    return w
