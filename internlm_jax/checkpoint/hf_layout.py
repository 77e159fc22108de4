"""Names and layouts of InternLM2's HF tensors versus our param tree.

HF stores linear weights [out, in]; ours are [in, out-dims] so that `linear` is x @ w. The packed wqkv rows
are grouped by kv head (per group: G queries, then k, then v, each H rows), so HF [K*(G+2)*H, D] transposes
and reshapes to ours [D, K, G+2, H] without reordering; wo HF [D, N*H] becomes ours [K, G, H, D] because
query head n = k*G + g sits at columns n*H .. n*H+H-1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from internlm_jax.config import ModelConfig

ToOurs = Callable[[np.ndarray, ModelConfig], np.ndarray]

# Tensors some exporters add that carry no weights (recomputed at run time): skipped when loading.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LeafSpec:
    """One leaf of our tree: where it lives, its HF name (with {i} for stacked layers) and the two layout maps."""

    path: tuple[str, ...]
    hf_name: str
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: ToOurs  # HF array (one layer) -> our layout (a view where possible)
    to_hf: ToOurs  # our array (one layer) -> HF layout

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def _same(x: np.ndarray, c: ModelConfig) -> np.ndarray:
    return x


def _t(x: np.ndarray, c: ModelConfig) -> np.ndarray:
    return x.T


def _wqkv_to_ours(x: np.ndarray, c: ModelConfig) -> np.ndarray:  # [K*(G+2)*H, D] -> [D, K, G+2, H]
    return x.T.reshape(c.hidden_size, c.num_kv_heads, c.groups + 2, c.head_dim)


def _wqkv_to_hf(x: np.ndarray, c: ModelConfig) -> np.ndarray:  # [D, K, G+2, H] -> [K*(G+2)*H, D]
    return x.reshape(c.hidden_size, -1).T


def _wo_to_ours(x: np.ndarray, c: ModelConfig) -> np.ndarray:  # [D, N*H] -> [K, G, H, D]
    return x.T.reshape(c.num_kv_heads, c.groups, c.head_dim, c.hidden_size)


def _wo_to_hf(x: np.ndarray, c: ModelConfig) -> np.ndarray:  # [K, G, H, D] -> [D, N*H]
    return x.reshape(-1, c.hidden_size).T


_L = "model.layers.{i}."
# In the order HF's own exporter writes them (embedding, then layer by layer, then final norm and head).
SPECS: tuple[LeafSpec, ...] = (
    LeafSpec(("embed",), "model.tok_embeddings.weight", lambda c: (c.vocab_size, c.hidden_size), _same, _same),
    LeafSpec(("layers", "wqkv"), _L + "attention.wqkv.weight",
             lambda c: (c.num_kv_heads * (c.groups + 2) * c.head_dim, c.hidden_size), _wqkv_to_ours, _wqkv_to_hf),
    LeafSpec(("layers", "wo"), _L + "attention.wo.weight",
             lambda c: (c.hidden_size, c.num_heads * c.head_dim), _wo_to_ours, _wo_to_hf),
    LeafSpec(("layers", "w1"), _L + "feed_forward.w1.weight", lambda c: (c.intermediate_size, c.hidden_size), _t, _t),
    LeafSpec(("layers", "w3"), _L + "feed_forward.w3.weight", lambda c: (c.intermediate_size, c.hidden_size), _t, _t),
    LeafSpec(("layers", "w2"), _L + "feed_forward.w2.weight", lambda c: (c.hidden_size, c.intermediate_size), _t, _t),
    LeafSpec(("layers", "attention_norm"), _L + "attention_norm.weight", lambda c: (c.hidden_size,), _same, _same),
    LeafSpec(("layers", "ffn_norm"), _L + "ffn_norm.weight", lambda c: (c.hidden_size,), _same, _same),
    LeafSpec(("norm",), "model.norm.weight", lambda c: (c.hidden_size,), _same, _same),
    LeafSpec(("output",), "output.weight", lambda c: (c.vocab_size, c.hidden_size), _t, _t),
)


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: a leaf spec and, for stacked leaves, the layer index."""

    spec: LeafSpec
    layer: int | None


def hf_tensors(config: ModelConfig) -> Iterator[tuple[str, Target]]:
    """Every HF tensor name of a checkpoint for `config`, in export order (layer-major inside the stack)."""
    for spec in SPECS[:1]:
        yield spec.hf_name, Target(spec, None)
    stacked = [s for s in SPECS if s.stacked]
    for i in range(config.num_layers):
        for spec in stacked:
            yield spec.hf_name.format(i=i), Target(spec, i)
    for spec in SPECS[1:]:
        if not spec.stacked:
            yield spec.hf_name, Target(spec, None)


def get_path(tree: dict, path: tuple[str, ...]) -> object:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
