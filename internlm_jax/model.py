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

from internlm_jax.config import ModelConfig
from internlm_jax.layers import apply_rope, attention_mask, linear, reference_attention, rms_norm, rope_tables
from internlm_jax.sharding import active_mesh, constrain

Params = dict[str, Any]
Cache = dict[str, jax.Array]


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
    """A dense KV cache: k/v [L, B, S, K, H]; `pos` [B, S] holds each slot's position (-1 = empty);
    `index` is the next slot to write (shared by the batch: prompts are left-padded)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch, max_len), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def _attention(q, k, v, mask, config: ModelConfig, segment_ids, by_position: bool, positions=None):
    mesh = active_mesh()
    if not by_position and mesh is not None and mesh.shape.get("sequence", 1) > 1:
        # Long context: the sequence is sharded; all-gather K/V and attend blockwise (causal by position and
        # segment, so a zigzag-permuted sequence is fine).
        from internlm_jax.seq_parallel import sequence_parallel_attention

        return sequence_parallel_attention(q, k, v, positions, segment_ids, mesh=mesh)
    from internlm_jax.kernels import resolve_impl

    impl = resolve_impl(config.attention_impl)  # auto: the kernel on TPU/GPU (or an AOT target), else reference
    if impl == "pallas" and not by_position:
        from internlm_jax.kernels import flash_attention_dispatch

        return flash_attention_dispatch(q, k, v, segment_ids)
    return reference_attention(q, k, v, mask)


def _layer(config: ModelConfig, x, lp, cos, sin, q_pos, q_seg, layer_cache, cache_meta):
    """One decoder block. x: [B, T, D]. layer_cache: (k, v) [B, S, K, H] slices or None."""
    dtype = jnp.dtype(config.dtype)
    G = config.groups

    h = rms_norm(x, lp["attention_norm"], config.rms_norm_eps)
    qkv = linear(h, lp["wqkv"], "D", "KQH", dtype)  # [B, T, K, G+2, H]
    qkv = constrain(qkv, ("batch", "length", "act_kv_heads", None, None))
    q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    if layer_cache is None:
        mask = attention_mask(q_pos, q_pos, q_seg, q_seg, by_position=False)
        attn = _attention(q, k, v, mask, config, q_seg, by_position=False, positions=q_pos)
        new_cache = None
    else:
        ck, cv = layer_cache
        index, k_pos = cache_meta
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
        mask = attention_mask(q_pos, k_pos, None, None, by_position=True)
        attn = _attention(q, ck.astype(dtype), cv.astype(dtype), mask, config, None, by_position=True)
        new_cache = (ck, cv)
    return block_output(config, x, lp, attn), new_cache


def block_output(config: ModelConfig, x, lp, attn):
    """The rest of a decoder block after attention: x + wo(attn), then x + w2(silu(w1 h) * w3 h).
    Shared by the dense path here and the paged path in internlm_jax.engine.paged_model."""
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


def forward(params: Params, tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None, *,
            config: ModelConfig, segment_ids: Int[Array, "B T"] | None = None, cache: Cache | None = None,
            return_hidden: bool = False) -> tuple[Float[Array, "B T V"], Cache | None]:
    """Logits (fp32) for `tokens`, and the updated cache when one is given.

    positions: per-token positions (restart per segment when packed; -1 marks padding written to a cache).
    segment_ids: packed documents; attention stays within equal ids (training/eval, no cache).
    cache: from `init_cache`; the new tokens are written at cache["index"] and attend to every filled slot
    whose position is <= theirs. A `PagedCache` (internlm_jax.engine) instead runs the paged path: the
    tokens' K/V go into the pages of cache.page_table after cache.lengths (positions -1 = padding).
    With return_hidden, the final-norm hidden states [B, T, D] are returned instead of logits (for chunked
    losses and value heads).
    """
    if cache is not None and not isinstance(cache, dict):  # a paged cache (internlm_jax.engine.PagedCache)
        from internlm_jax.engine.paged_model import paged_forward

        return paged_forward(params, tokens, positions, config=config, cache=cache, return_hidden=return_hidden)
    B, T = tokens.shape
    dtype = jnp.dtype(config.dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if cache is not None:
            positions = positions + cache["index"]
    positions = positions.astype(jnp.int32)

    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    x = constrain(x, ("batch", "length", "act_embed"))

    if cache is not None:
        k_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, cache["index"]))
        seq_len = jnp.max(k_pos) + 1
    else:
        k_pos = None
        seq_len = jnp.max(positions) + 1
    cos, sin = rope_tables(config, positions, seq_len)

    def body(x, layer_in):
        lp, lc = layer_in
        x, new_c = _layer(config, x, lp, cos, sin, positions, segment_ids, lc,
                          None if cache is None else (cache["index"], k_pos))
        return x, new_c

    if config.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[config.remat], prevent_cse=not config.scan_layers)

    layer_caches = None if cache is None else (cache["k"], cache["v"])
    if config.scan_layers:
        x, new_caches = jax.lax.scan(body, x, (params["layers"], layer_caches))
    else:
        outs = []
        for i in range(config.num_layers):
            sl = jax.tree.map(lambda a: a[i], (params["layers"], layer_caches))
            x, c = body(x, sl)
            outs.append(c)
        new_caches = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

    x = rms_norm(x, params["norm"], config.rms_norm_eps)
    new_cache = None
    if cache is not None:
        new_cache = {"k": new_caches[0], "v": new_caches[1], "pos": k_pos, "index": cache["index"] + T}
    if return_hidden:
        return x, new_cache
    logits = linear(x, params["output"], "D", "V", dtype).astype(jnp.float32)
    logits = constrain(logits, ("batch", "length", "act_vocab"))
    return logits, new_cache
