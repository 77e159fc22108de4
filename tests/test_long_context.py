"""Long contexts on the one model path: an 8K-token prompt on a dynamic-NTK checkpoint with max_position_embeddings
1024 (so it is 8x the trained length), prefilled in chunks of several sizes over the paged cache, equals one
chunk and equals the dense uncached forward; the chunked scorer's memory does not grow with T x vocab."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import internlm_jax as ij
from internlm_jax.engine import Engine, EngineConfig, SamplingParams
from internlm_jax.kv_cache import init_paged_cache
from internlm_jax.scoring import _chunk

T = 8192


@pytest.fixture(scope="module")
def lm():
    return ij.init("internlm2-tiny", seed=2, max_position_embeddings=1024, rope_scaling=("dynamic", 2.0),
                   max_context=T + 64)


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(1)
    return [1] + [int(t) for t in rng.integers(3, 1000, T - 1)]


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.slow
def test_8k_chunked_equals_one_chunk_equals_dense(lm, ids):
    dense = lm.logits(ids)  # [T, V] from one uncached forward
    want = _log_softmax(dense)[np.arange(T - 1), ids[1:]]
    for chunk in (1000, T):  # 1000 does not divide T: the last chunk is partial
        got = lm.score(ids, chunk=chunk)
        np.testing.assert_allclose(got.token_logprobs, want, atol=2e-4, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(got.last_logits, dense[-1], atol=2e-4, err_msg=f"chunk {chunk}")
    np.testing.assert_allclose(lm.logits(ids, positions="last"), dense[-1], atol=2e-4)
    # the engine prefills the same prompt in 512-token chunks: its first token is the dense argmax
    ec = EngineConfig(page_size=64, num_pages=T // 64 + 4, max_num_seqs=1, max_model_len=T + 64,
                      max_num_batched_tokens=512, max_prefill_rows=1, warmup=False)  # 16 chunks
    out = Engine(lm.params, lm.config, ec).generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
    assert out[0].outputs[0].token_ids == [int(np.argmax(dense[-1]))]


def test_chunked_scorer_memory_does_not_grow_with_length(lm):
    """Compiled temporaries of one chunk step are the same for a 4K and a 64K context (only the KV cache
    argument grows), and far below [T, V] fp32 logits."""
    C = 256
    temps = {}
    for n in (4096, 65536):
        pages = n // 64
        cache = init_paged_cache(lm.config, pages, 64, batch=1, max_pages_per_seq=pages)
        tok = jnp.zeros((1, C), jnp.int32)
        exe = _chunk.lower(lm.params, tok, tok, tok, cache, jnp.ones((1,), jnp.int32), config=lm.config,
                           top_k=0).compile()
        temps[n] = exe.memory_analysis().temp_size_in_bytes
    assert temps[65536] <= 1.1 * temps[4096], temps
    assert temps[65536] < 65536 * lm.config.vocab_size * 4 / 8, temps


def test_last_position_logits_match_all(lm, ids):
    short = ids[:300]
    np.testing.assert_allclose(lm.logits(short, positions="last"), lm.logits(short)[-1], atol=2e-5)
    with pytest.raises(ij.ConfigError, match="positions"):
        lm.logits(short, positions="first")


@pytest.mark.parametrize("T_q", [8, 2])
def test_blockwise_reference_equals_one_block(monkeypatch, T_q):
    """The memory-bounded block-by-block reference (online softmax, future blocks skipped) equals the one-block
    form, with NaN in every slot no row owns and rows of different lengths."""
    import importlib

    pa = importlib.import_module("kernels_pallas.paged_attention")  # the module (the package exports the function)
    rng = np.random.default_rng(0)
    B, K, G, H, S, P, W = 2, 2, 2, 16, 8, 40, 16
    q = jnp.asarray(rng.normal(size=(B, T_q, K, G, H)), jnp.float32)
    kp = np.full((P, S, K, H), np.nan, np.float32)
    vp = np.full((P, S, K, H), np.nan, np.float32)
    table = np.stack([rng.permutation(P)[:W] for _ in range(B)]).astype(np.int32)
    lengths = np.array([W * S - 5, 37], np.int32)
    for b in range(B):
        for p in range(lengths[b]):
            kp[table[b, p // S], p % S] = rng.normal(size=(K, H))
            vp[table[b, p // S], p % S] = rng.normal(size=(K, H))
    qpos = np.stack([np.arange(n - T_q, n) for n in lengths]).astype(np.int32)
    args = (q, jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(table), jnp.asarray(lengths))
    monkeypatch.setattr(pa, "BLOCK_KEYS", 10**9)
    one = pa.paged_attention_reference(*args, q_positions=jnp.asarray(qpos))
    monkeypatch.setattr(pa, "BLOCK_KEYS", 3 * S)  # 3 pages a block, and > 8 blocks so decode splits too
    blocks = pa._blockwise(q, jnp.asarray(kp), jnp.asarray(vp), None, None, jnp.asarray(table),
                           jnp.asarray(lengths), jnp.asarray(qpos), None, H ** -0.5)
    assert np.isfinite(np.asarray(one)).all()
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(one), atol=2e-5)
