"""The inference engine: paged KV cache, continuous batching with chunked prefill, prefix caching,
per-request sampling, int8 KV, tensor parallelism, and an async streaming API.

    from internlm_jax.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(params, config, EngineConfig(max_num_seqs=64, page_size=64), tokenizer=tok)
    outs = engine.generate([ids_a, ids_b], SamplingParams(temperature=0.7, max_tokens=128))
    async for ev in engine.submit(ids, SamplingParams(stop=("<|im_end|>",))): ...   # TokenEvents
    engine.abort(request_id); engine.stats()

Modules: paged_model (the forward over a page pool; also reached via model.forward(cache=PagedCache)),
pages (page allocator, refcounts, prefix hashes, LRU), scheduler (slots, chunked prefill, preemption),
sampling (SamplingParams, the vectorised sampler), runner (device state, shape buckets, compile counters),
detok (incremental text, stop strings), engine (the Engine), reference (uncached and dense baselines).
"""

from internlm_jax.engine.engine import (CompletionOutput, Engine, EngineConfig, RequestOutput, RequestStream,
                                        TokenEvent)
from internlm_jax.engine.paged_model import PagedCache, init_paged_cache, paged_attention_reference, paged_forward
from internlm_jax.engine.sampling import SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "PagedCache", "RequestOutput", "RequestStream",
           "SamplingParams", "TokenEvent", "init_paged_cache", "paged_attention_reference", "paged_forward"]
