"""Logical axis names for params trees that hold int4 `QuantizedLinear` weights (for `sharding.tree_shardings`).

A quantized weight's leaves are flattened matrices: packed [L, Din/2, Dout], scales / zeros [L, Din/g, Dout],
input_scale [L, Din]. The flattened input dim takes the logical name of the weight's first input dim and the
output dim that of its first output dim (wqkv: embed -> kv_heads, wo: kv_heads -> embed, w1/w3: embed -> mlp,
w2: mlp -> embed, output: embed -> vocab). Sharding a flattened dim by its leading logical dim is the same
split as sharding that dim of the dense weight: kv head k owns the contiguous rows k*G*H .. (k+1)*G*H - 1.
"""

from __future__ import annotations

from typing import Any

import jax

from internlm_jax.config import ModelConfig
from internlm_jax.model import param_axes
from internlm_jax.quant.int4 import LINEAR_AXES, QuantizedLinear


def quantized_param_axes(params: Any, config: ModelConfig) -> Any:
    """A tree shaped like `params` (arrays and QuantizedLinear leaves) holding each leaf's logical axis names."""
    dense = param_axes(config)

    def go(path: tuple[Any, ...], leaf: Any) -> Any:
        keys = [str(k.key) for k in path if hasattr(k, "key")]
        names = dense
        for k in keys:
            names = names[k]
        names = tuple(names)
        if not isinstance(leaf, QuantizedLinear):
            return names
        lead = 1 if keys[0] == "layers" else 0
        nin = len(LINEAR_AXES[keys[-1]][0])
        row, col = names[lead], names[lead + nin]
        mat = names[:lead] + (row, col)
        return leaf.replace(weight=jax.tree.map(lambda _: mat, leaf.weight),
                            input_scale=None if leaf.input_scale is None else names[:lead] + (row,))

    return jax.tree_util.tree_map_with_path(go, params, is_leaf=lambda x: isinstance(x, QuantizedLinear))
