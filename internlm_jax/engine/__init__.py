"""The inference engine: paged KV cache, continuous batching with chunked prefill, prefix caching,
per-request sampling, int8 KV, tensor parallelism, and an async streaming API.

    from internlm_jax.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(params, config, EngineConfig(max_num_seqs=64, page_size=64), tokenizer=tok)
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0.7, max_tokens=128))
    async for ev in engine.submit(ids, SamplingParams(stop=("<|im_end|>",))): ...   # TokenEvents
    engine.abort(request_id); engine.stats()

The engine runs the model's one forward (`model.forward` with a `kv_cache.PagedCache`) and the one sampler
(`internlm_jax.sampling`). Modules: pages (page allocator, refcounts, prefix hashes, LRU), scheduler (slots,
chunked prefill, preemption), runner (device state, shape buckets, compile counters), detok (incremental text,
stop strings), engine (the Engine), reference (uncached and dense baselines).
"""

from internlm_jax.engine.engine import (
                                        CompletionOutput,
                                        Engine,
                                        EngineConfig,
                                        RequestOutput,
                                        RequestStream,
                                        TokenEvent,
)
from internlm_jax.kv_cache import PagedCache, init_paged_cache
from internlm_jax.sampling import SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "PagedCache", "RequestOutput", "RequestStream",
           "SamplingParams", "TokenEvent", "init_paged_cache"]
