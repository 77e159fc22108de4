"""A tiny real server for tests, demos and the serving benchmark: random-weight preset + small engine.

    with tiny_server(tokenizer_dir) as (url, backend):
        openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(...)

Everything is real (engine, scheduler, pages, uvicorn on 127.0.0.1); only the weights are random, so the
replies are noise. Bucket lists are kept to one size each so warm-up compiles three programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from internlm_jax.serve.backend import Backend, ServeConfig
from internlm_jax.serve.server import ServerThread


def tiny_engine(lm: Any, *, max_batch: int = 8, max_len: int = 256, page_size: int = 16, num_pages: int = 160,
                chunk: int = 64, **overrides: Any) -> Any:
    from internlm_jax.engine import Engine, EngineConfig

    kw: dict[str, Any] = {
        "page_size": page_size, "num_pages": num_pages, "max_num_seqs": max_batch, "max_model_len": max_len,
        "max_num_batched_tokens": max(chunk + max_batch, 2 * max_batch), "chunk_size": chunk,
        "max_prefill_rows": 2, "decode_batch_buckets": (max_batch,), "prefill_batch_buckets": (2,),
        "chunk_buckets": (chunk,), "width_buckets": (-(-max_len // page_size),)}
    kw.update(overrides)
    return Engine(lm.params, lm.config, EngineConfig(**kw), tokenizer=lm.tokenizer, mesh=lm.mesh)


@contextlib.contextmanager
def serve_in_thread(engine: Any, tokenizer: Any, config: ServeConfig | None = None, *,
                    log_level: str = "warning") -> Iterator[tuple[str, Backend]]:
    """Serve `engine` on 127.0.0.1 (a free port) for the duration of the block; yields (base url, backend)."""
    from internlm_jax.serve.app import create_app

    backend = Backend(engine, tokenizer, config or ServeConfig(model_name="tiny"))
    srv = ServerThread(create_app(backend), log_level=log_level).start()
    try:
        yield srv.url, backend
    finally:
        srv.stop()


@contextlib.contextmanager
def tiny_server(tokenizer_dir: str, *, preset: str = "internlm2-tiny", seed: int = 0,
                config: ServeConfig | None = None, **engine_kw: Any) -> Iterator[tuple[str, Backend]]:
    import internlm_jax as ij

    lm = ij.init(preset, seed=seed, tokenizer=tokenizer_dir)
    engine = tiny_engine(lm, **engine_kw)
    cfg = config or ServeConfig(model_name="tiny", random_weights=True)
    try:
        with serve_in_thread(engine, lm.tokenizer, dataclasses.replace(cfg)) as out:
            yield out
    finally:
        engine.shutdown()


__all__ = ["serve_in_thread", "tiny_engine", "tiny_server"]


def script_engine(engine: Any, script_for: Any) -> list[list[int]]:
    """Force the tokens an engine samples (tests of the reply path; the model's choice is overridden).

    `script_for(prompt_ids, request_id) -> list[int] | None` gives the tokens a request must produce (None:
    keep the model's own); it is asked once per request. Everything after the choice is real: stop tokens, detokenisation, events, pages. Token k of
    a sequence is script[k]; past the script's end the engine's EOS is forced. Returns the list that records
    the prompt ids of every request the engine receives (to check the rendered template).
    """
    received: list[list[int]] = []
    real_add, real_run = engine.add_request, engine.runner.run
    eos = min(engine.eos)
    scripts: dict[str, list[int] | None] = {}

    def add_request(prompt_ids: Any, *args: Any, **kwargs: Any) -> str:
        received.append([int(t) for t in prompt_ids])
        return real_add(prompt_ids, *args, **kwargs)

    def run(rows: list) -> list:
        out = []
        for row, res in zip(rows, real_run(rows)):
            if res is not None:
                req = row.seq.request
                if req.request_id not in scripts:
                    scripts[req.request_id] = script_for(req.prompt_ids, req.request_id)
                script = scripts[req.request_id]
                if script is not None:
                    k = row.seq.num_generated
                    res = (int(script[k]) if k < len(script) else eos, 0.0, res[2], res[3])
            out.append(res)
        return out

    engine.add_request, engine.runner.run = add_request, run
    return received


__all__ += ["script_engine"]
