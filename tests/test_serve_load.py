"""Load: 64 concurrent streaming clients (mixed prompt and output lengths) all get exactly the greedy tokens
of an uncached reference; 8 of them hang up mid-stream, are aborted, and their KV pages come back (read
from /metrics); the server keeps answering. (The queue-overflow 429 is in test_serve_errors.py.)"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.engine.reference import greedy_uncached
from internlm_jax.serve.backend import ServeConfig
from internlm_jax.serve.metrics import parse_metrics
from internlm_jax.serve.testing import serve_in_thread, tiny_engine

CLIENTS = 64
DROPPERS = {3, 11, 19, 27, 35, 43, 51, 59}  # these disconnect after a few tokens
PROMPT_LENS = [5, 12, 20, 33, 47, 64, 90, 120]
MAX_NEW = 64


def _max_tokens(i: int) -> int:
    return MAX_NEW if i in DROPPERS else 4 + (i * 7) % (MAX_NEW - 3)


@pytest.mark.slow
def test_64_concurrent_streams_with_disconnects(tmp_path):
    lm = ij.init("internlm2-tiny", seed=1, tokenizer=make_tokenizer_dir(tmp_path / "tok"))
    rng = np.random.default_rng(0)
    prompts = [[1] + [int(t) for t in rng.integers(3, 1018, n - 1)] for n in PROMPT_LENS]
    ref = greedy_uncached(lm.params, lm.config, prompts, MAX_NEW, pad_to=192)
    engine = tiny_engine(lm, max_batch=8, max_len=256, num_pages=160)
    try:
        with serve_in_thread(engine, lm.tokenizer, ServeConfig(model_name="tiny")) as (url, _backend):
            results = asyncio.run(_load(url, prompts))
            for i, (status, ids, finish) in enumerate(results):
                assert status == 200, (i, status)
                p = i % len(prompts)
                if i in DROPPERS:
                    assert finish is None and 3 <= len(ids) < MAX_NEW and ids == ref[p][: len(ids)], i
                else:
                    assert finish == "length" and ids == ref[p][: _max_tokens(i)], i

            deadline = time.monotonic() + 30
            while True:  # aborts are asynchronous: wait for the server to notice every hang-up
                m = parse_metrics(httpx.get(url + "/metrics").text)
                if (m["internlm_jax_kv_pages_used"] == 0 and m["internlm_jax_http_requests_in_flight"] == 0
                        and m["internlm_jax_requests_aborted_total"] == len(DROPPERS)) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert m["internlm_jax_requests_aborted_total"] == len(DROPPERS)
            assert m["internlm_jax_kv_pages_used"] == 0 and m["internlm_jax_http_requests_in_flight"] == 0
            assert m["internlm_jax_num_requests_running"] == 0 and m["internlm_jax_num_requests_waiting"] == 0
            assert m["internlm_jax_compilations_since_warmup"] == 0
            assert m['internlm_jax_requests_total{endpoint="/v1/completions",status="200"}'] == CLIENTS
            engine.allocator.check_invariants()
            # still serving
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompts[0], "max_tokens": 5,
                                                         "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == ref[0][:5]
            assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        engine.shutdown()


async def _load(url: str, prompts: list[list[int]]) -> list[tuple[int, list[int], str | None]]:
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(i: int) -> tuple[int, list[int], str | None]:
            body = {"model": "tiny", "prompt": prompts[i % len(prompts)], "max_tokens": _max_tokens(i),
                    "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
            ids: list[int] = []
            finish = None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return r.status_code, ids, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    for c in json.loads(line[6:])["choices"]:
                        ids += c.get("token_ids") or []
                        finish = c["finish_reason"] or finish
                    if i in DROPPERS and len(ids) >= 3:
                        break  # leaving the block closes the connection mid-stream
            return 200, ids, finish

        return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(CLIENTS)]), 300)
