"""A small numpy InternLM2 with the official remote code's rotary rule, written from its semantics.

The official `modeling_internlm2.py` (dynamic NTK): every forward call computes the rotation of its new
tokens with base = theta * ((f * S / M) - (f - 1)) ** (H / (H - 2)) where S = max(position_ids) + 1 of that
call, when S > M (else theta); keys already in the KV cache keep the rotation they were written with. So a
prompt prefilled in one call is rotated with the base of its length P, and the decode token at position p
with the base of p + 1. Linear scaling divides positions by the factor. Attention is causal GQA with fp32
softmax; RMSNorm in fp32. This is one sequence (batch 1), as a server sees it, computed in float64.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope(x, positions, config, seq_len):
    """x [T, heads, H] rotated (rotate_half convention) at `positions` with the base for length seq_len."""
    H = config.head_dim
    base = config.rope_theta
    pos = positions.astype(np.float64)
    if config.rope_scaling is not None:
        kind, f = config.rope_scaling
        M = config.max_position_embeddings
        if kind == "dynamic" and seq_len > M:
            base = config.rope_theta * ((f * seq_len / M) - (f - 1)) ** (H / (H - 2))
        if kind == "linear":
            pos = pos / f
    inv = 1.0 / base ** (np.arange(0, H, 2) / H)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., H // 2:], x[..., : H // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


class NumpyInternLM2:
    def __init__(self, params, config):
        self.p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict)
                      else {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
        self.c = config

    def new_cache(self):
        L = self.c.num_layers
        return {"k": [np.zeros((0, self.c.num_kv_heads, self.c.head_dim)) for _ in range(L)],
                "v": [np.zeros((0, self.c.num_kv_heads, self.c.head_dim)) for _ in range(L)]}

    def forward(self, tokens, cache):
        """One call: tokens at positions len(cache) .. ; returns logits [T, V] and extends the cache."""
        c, p = self.c, self.p
        G = c.groups
        start = cache["k"][0].shape[0]
        T = len(tokens)
        positions = np.arange(start, start + T)
        seq_len = start + T  # max(position_ids) + 1 of this call
        x = p["embed"][np.asarray(tokens)]
        for i in range(c.num_layers):
            lp = {k: v[i] for k, v in p["layers"].items()}
            h = _rms(x, lp["attention_norm"], c.rms_norm_eps)
            qkv = np.einsum("TD,DKQH->TKQH", h, lp["wqkv"])
            q = _rope(qkv[:, :, :G].reshape(T, -1, c.head_dim), positions, c, seq_len)
            q = q.reshape(T, c.num_kv_heads, G, c.head_dim)
            k = _rope(qkv[:, :, G], positions, c, seq_len)
            v = qkv[:, :, G + 1]
            cache["k"][i] = np.concatenate([cache["k"][i], k])
            cache["v"][i] = np.concatenate([cache["v"][i], v])
            K, V = cache["k"][i], cache["v"][i]
            s = np.einsum("TKGH,SKH->KGTS", q, K) / np.sqrt(c.head_dim)
            kpos = np.arange(K.shape[0])
            s = np.where(kpos[None, :] <= positions[:, None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s = s / s.sum(-1, keepdims=True)
            attn = np.einsum("KGTS,SKH->TKGH", s, V)
            x = x + np.einsum("TKGH,KGHD->TD", attn, lp["wo"])
            h = _rms(x, lp["ffn_norm"], c.rms_norm_eps)
            g, u = h @ lp["w1"], h @ lp["w3"]
            x = x + ((g / (1 + np.exp(-g))) * u) @ lp["w2"]
        return _rms(x, p["norm"], c.rms_norm_eps) @ p["output"]

    def logits(self, tokens):
        return self.forward(tokens, self.new_cache())

    def greedy(self, prompt, n, with_logprobs=False):
        """Prefill the prompt in one call, then decode n tokens one call each (the official generate)."""
        cache = self.new_cache()
        logits = self.forward(prompt, cache)[-1]
        out, lps = [], []
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            lps.append(float(log_softmax(logits)[out[-1]]))
            logits = self.forward([out[-1]], cache)[-1]
        return (out, lps) if with_logprobs else out


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
