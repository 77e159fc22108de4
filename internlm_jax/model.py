"""The functional InternLM2 model: `init_params`, `forward`, a dense KV cache, and the param layout.

Param layout (a plain nested dict; per-layer weights stacked on a leading L axis and run with lax.scan):

    embed                 [V, D]
    layers/attention_norm [L, D]
    layers/wqkv           [L, D, K, G+2, H]   packed like the HF checkpoint: per kv group G queries, k, v
    layers/wo             [L, K, G, H, D]
    layers/ffn_norm       [L, D]
    layers/w1             [L, D, F]  (gate)    layers/w3 [L, D, F] (up)    layers/w2 [L, F, D] (down)
    norm                  [D]
    output                [D, V]

`param_axes` gives the logical axis names of every leaf; `internlm_jax.sharding` maps them to a mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from internlm_jax import kv_cache
from internlm_jax.config import ModelConfig
from internlm_jax.layers import apply_rope, linear, rms_norm, rope_tables
from internlm_jax.sharding import constrain

Params = dict[str, Any]
Cache = kv_cache.DenseCache


def param_shapes(config: ModelConfig) -> Params:
    """Shapes of every leaf, same structure as `init_params`."""
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    K, G, H = config.num_kv_heads, config.groups, config.head_dim
    return {
        "embed": (V, D),
        "layers": {
            "attention_norm": (L, D),
            "wqkv": (L, D, K, G + 2, H),
            "wo": (L, K, G, H, D),
            "ffn_norm": (L, D),
            "w1": (L, D, F),
            "w3": (L, D, F),
            "w2": (L, F, D),
        },
        "norm": (D,),
        "output": (D, V),
    }


def param_axes(config: ModelConfig | None = None) -> Params:
    """Logical axis names of every leaf (same structure as `init_params`)."""
    return {
        "embed": ("vocab", "embed"),
        "layers": {
            "attention_norm": ("layers", "norm"),
            "wqkv": ("layers", "embed", "kv_heads", "qkv", "head_dim"),
            "wo": ("layers", "kv_heads", "q_group", "head_dim", "embed"),
            "ffn_norm": ("layers", "norm"),
            "w1": ("layers", "embed", "mlp"),
            "w3": ("layers", "embed", "mlp"),
            "w2": ("layers", "mlp", "embed"),
        },
        "norm": ("norm",),
        "output": ("embed", "vocab"),
    }


def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """Random weights (normal, std 0.02; norms at 1), in config.param_dtype."""
    shapes = param_shapes(config)
    dtype = jnp.dtype(config.param_dtype)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """A dense KV cache (see internlm_jax.kv_cache): k/v [L, B, S, K, H]; `pos` [B, S] holds each slot's
    position (-1 = empty); `index` is the next slot to write (shared by the batch: prompts are left-padded)."""
    return kv_cache.init_dense_cache(config, batch, max_len, dtype)


def _layer(config: ModelConfig, x, lp, cos, sin, positions, segment_ids, cache, step, layer):
    """One decoder block. x: [B, T, D]; the cache (none, dense or paged) is written and attended through
    the kv_cache interface, which picks the attention backend."""
    G = config.groups
    h = rms_norm(x, lp["attention_norm"], config.rms_norm_eps)
    qkv = linear(h, lp["wqkv"], "D", "KQH", jnp.dtype(config.dtype))  # [B, T, K, G+2, H]
    qkv = constrain(qkv, ("batch", "length", "act_kv_heads", None, None))
    q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    attn, cache = kv_cache.attend(cache, step, layer, q, k, v, positions, segment_ids, config)
    return block_output(config, x, lp, attn), cache


def block_output(config: ModelConfig, x, lp, attn):
    """The rest of a decoder block after attention: x + wo(attn), then x + w2(silu(w1 h) * w3 h)."""
    dtype = jnp.dtype(config.dtype)
    attn = constrain(attn, ("batch", "length", "act_kv_heads", None, None))
    x = x + linear(attn, lp["wo"], "KGH", "D", dtype).astype(x.dtype)
    x = constrain(x, ("batch", "length", "act_embed"))

    h = rms_norm(x, lp["ffn_norm"], config.rms_norm_eps)
    gate = linear(h, lp["w1"], "D", "F", dtype)
    up = linear(h, lp["w3"], "D", "F", dtype)
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    x = x + linear(act, lp["w2"], "F", "D", dtype).astype(x.dtype)
    return constrain(x, ("batch", "length", "act_embed"))


_REMAT = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def head(params: Params, x: Float[Array, "... D"], config: ModelConfig) -> Float[Array, "... V"]:
    """The output projection of final-norm hidden states: fp32 logits."""
    logits = linear(x, params["output"], "D", "V", jnp.dtype(config.dtype)).astype(jnp.float32)
    names = ("batch", "length", "act_vocab") if logits.ndim == 3 else ("batch", "act_vocab")
    return constrain(logits, names)


def forward(params: Params, tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None, *,
            config: ModelConfig, segment_ids: Int[Array, "B T"] | None = None, cache: Any = None,
            rope_len: Int[Array, "B"] | None = None, logits_index: Int[Array, "B"] | None = None,
            return_hidden: bool = False, fresh: bool = False) -> tuple[Array, Any]:
    """Logits (fp32) for `tokens`, and the updated cache when one is given.

    positions: per-token positions (restart per segment when packed; -1 marks padding: never written to a
    cache, never enlarging a row's rotary length). Default: 0.. (after the cache's tokens).
    segment_ids: packed documents; attention stays within equal ids (training/eval, no cache).
    cache: None; a dense cache from `init_cache` (the new tokens are written at cache["index"] and attend to
    every filled slot whose position is <= theirs); or a `kv_cache.PagedCache` (the tokens' K/V go into the
    pages of cache.page_table after cache.lengths). The layers are the same code for all three.
    rope_len: [B] the length each row's rotation must cover under dynamic NTK (see layers.rope_tables):
    a chunked prefill passes its whole prompt's length; default each row's own length.
    logits_index: [B] index into T; only those tokens' logits are computed ([B, V] instead of [B, T, V]).
    fresh: a prefill into an empty PagedCache (positions 0.. in order): attention within the block, so under
    a mesh with a `sequence` axis the prompt is sharded over devices (sequence-parallel prefill), and the
    pages are filled for the decode that follows.
    With return_hidden, the final-norm hidden states are returned instead of logits (for chunked losses and
    value heads).
    """
    B, T = tokens.shape
    dtype = jnp.dtype(config.dtype)
    if positions is None:
        positions = kv_cache.default_positions(cache, B, T)
    positions = positions.astype(jnp.int32)

    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    cache, step = kv_cache.begin(cache, positions, fresh)
    cos, sin = rope_tables(config, positions, step.key_len if rope_len is None else rope_len.astype(jnp.int32))

    def body(carry, layer_in):
        x, c = carry
        lp, layer = layer_in
        x, c = _layer(config, x, lp, cos, sin, positions, segment_ids, c, step, layer)
        return (x, c), None

    if config.remat != "none" and cache is None:  # recomputation only pays off when there is a backward
        body = jax.checkpoint(body, policy=_REMAT[config.remat], prevent_cse=not config.scan_layers)

    # The cache rides in the carry, so each layer's write updates the buffer in place.
    if config.scan_layers:
        layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (params["layers"], layer_ids))
    else:
        for i in range(config.num_layers):
            (x, cache), _ = body((x, cache), (jax.tree.map(lambda a: a[i], params["layers"]), i))
    cache = kv_cache.end(cache, step, T)

    if logits_index is not None:
        x = jnp.take_along_axis(x, logits_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]  # [B, D]
    x = rms_norm(x, params["norm"], config.rms_norm_eps)
    if return_hidden:
        return x, cache
    return head(params, x, config), cache
