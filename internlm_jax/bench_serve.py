"""`internlm-jax bench serve`: an HTTP load generator for the OpenAI server, and its ratio to the engine.

    # start a server for --model, measure the engine in-process, then the same workload over HTTP:
    internlm-jax bench serve --model internlm2-small --tokenizer /tmp/tok --concurrency 64 --num-prompts 256
    # against a running server (no engine baseline unless --engine-tok-s is given):
    internlm-jax bench serve --url http://127.0.0.1:23333 --request-rate 16 --num-prompts 500

Workload: `--num-prompts` random token-id prompts (seeded) with input and output lengths drawn uniformly
within `--range-ratio` of `--input-len` / `--output-len`; every request streams from /v1/completions with
`ignore_eos` so it produces exactly its output length. Requests are sent at `--concurrency` in flight
(closed loop) or at `--request-rate` per second (Poisson arrivals, open loop; both limits may be given).
Printed like LMDeploy's profile_restful_api: req/s, input/output tok/s, TTFT / ITL / E2E at P50/P90/P99.

With --model, the same workload first runs through `Engine.submit` in this process (same concurrency or
rate); the HTTP run is then served by this process while the clients run in `--client-procs` child
processes (client and server share no GIL, and an httpx client costs ~0.1-0.2 ms of CPU per streamed
chunk, so one process can be the bottleneck), and `http_over_engine` = HTTP output tok/s / in-process
output tok/s: what HTTP, JSON, SSE and detokenisation cost. Target: >= 0.90 at 64 concurrent streams.
Both need free CPU cores: on a host whose cores are busy the ratio measures the contention instead.

`--mask-overhead` (with --model) measures constrained decoding instead: the engine's step time at batch 16
with half the rows under a JSON-schema grammar (masks computed on the host by llguidance each step) over
the same step with every row free, and the host time the masks take per step. Target: ratio < 1.10.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @staticmethod
    def random(num: int, input_len: int, output_len: int, range_ratio: float, vocab: int, seed: int) -> Workload:
        rng = random.Random(seed)

        def length(mean: int) -> int:
            lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
            return rng.randint(lo, hi)

        # Ids from the middle of the vocabulary: no control tokens; BOS first, as a real prompt has.
        lo_id, hi_id = min(260, vocab // 4), vocab - 8
        prompts = [[1] + [rng.randint(lo_id, hi_id) for _ in range(length(input_len) - 1)] for _ in range(num)]
        return Workload(prompts, [length(output_len) for _ in range(num)])


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""
    start: float = 0.0  # time.perf_counter() (CLOCK_MONOTONIC: comparable across processes on one host)
    end: float = 0.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    f, c = math.floor(k), math.ceil(k)
    return s[f] + (s[c] - s[f]) * (k - f)


def summarize(results: list[RequestResult], duration: float | None = None) -> dict[str, Any]:
    if duration is None:  # first request sent to last one done
        duration = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_len for r in ok)
    itl = [x for r in ok for x in r.itl]
    s: dict[str, Any] = {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration if duration else 0.0,
        "input_tok_s": in_tok / duration if duration else 0.0, "output_tok_s": out_tok / duration if duration else 0.0,
        "total_output_tokens": out_tok,
    }
    for name, vals, scale in (("ttft_ms", [r.ttft for r in ok], 1e3), ("itl_ms", itl, 1e3),
                              ("e2e_s", [r.e2e for r in ok], 1.0)):
        s[name] = {"mean": (sum(vals) / len(vals) * scale) if vals else float("nan"),
                   "min": min(vals) * scale if vals else float("nan"),
                   "max": max(vals) * scale if vals else float("nan"),
                   **{f"p{q}": _pct(vals, q) * scale for q in (50, 90, 99)}}
    errors = [r.error for r in results if not r.ok]
    if errors:
        s["first_error"] = errors[0]
    return s


async def _drive(workload: Workload, concurrency: int | None, rate: float | None, seed: int, one,
                 indices: list[int] | None = None) -> tuple[list, float]:
    """Run `one(i)` for every request (or `indices`) under the concurrency cap and/or Poisson arrival rate."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed + 1)

    async def guarded(i: int) -> Any:
        if sem is None:
            return await one(i)
        async with sem:
            return await one(i)

    t0 = time.perf_counter()
    tasks = []
    for i in (range(len(workload.prompts)) if indices is None else indices):
        tasks.append(asyncio.ensure_future(guarded(i)))
        if rate:
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


async def http_results(url: str, workload: Workload, *, model: str | None, concurrency: int | None,
                       rate: float | None, api_key: str | None = None, seed: int = 0, timeout: float = 600.0,
                       indices: list[int] | None = None) -> list[RequestResult]:
    """Stream every request (or `indices`) from /v1/completions; per-request timings."""
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Idle connections are dropped after 4 s, before uvicorn's 5 s keep-alive timeout closes them from its
    # side (reusing a connection the server is closing is a ReadError that is not the server's fault).
    limits = httpx.Limits(max_connections=concurrency or 1024, max_keepalive_connections=concurrency or 256,
                          keepalive_expiry=4.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout, connect=30.0)) as client:
        if model is None:
            r = await client.get(base + "/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]

        async def one(i: int) -> RequestResult:
            prompt = workload.prompts[i]
            res = RequestResult(False, len(prompt))
            body = {"model": model, "prompt": prompt, "max_tokens": workload.output_lens[i], "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "return_token_ids": True}
            res.start = t0 = time.perf_counter()
            last = None
            buf = b""
            try:
                async with client.stream("POST", base + "/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        res.error = f"HTTP {r.status_code}: {r.text[:200]}"
                        return res
                    # SSE by hand on bytes (events end with a blank line): the client must cost little
                    # per token, or it, not the server, sets the pace.
                    async for part in r.aiter_raw():
                        buf += part
                        *events, buf = buf.split(b"\n\n")
                        n = 0
                        for ev in events:
                            if not ev.startswith(b"data: {"):
                                continue
                            chunk = json.loads(ev[6:])
                            if "error" in chunk:
                                res.error = chunk["error"]["message"]
                                return res
                            n += sum(len(c.get("token_ids") or ()) for c in chunk["choices"])
                        if n:
                            now = time.perf_counter()
                            if last is None:
                                res.ttft = now - t0
                            else:
                                res.itl.append(now - last)
                            last = now
                            res.output_tokens += n
                res.end = time.perf_counter()
                res.e2e = res.end - t0
                res.ok = res.output_tokens == workload.output_lens[i]
                if not res.ok:
                    res.error = f"got {res.output_tokens} tokens, expected {workload.output_lens[i]}"
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                res.error = f"{type(e).__name__}: {e}"
            res.end = res.end or time.perf_counter()
            return res

        results, _ = await _drive(workload, concurrency, rate, seed, one, indices)
    return results


async def run_http(url: str, workload: Workload, *, model: str | None, concurrency: int | None, rate: float | None,
                   api_key: str | None = None, seed: int = 0, timeout: float = 600.0) -> dict[str, Any]:
    return summarize(await http_results(url, workload, model=model, concurrency=concurrency, rate=rate,
                                        api_key=api_key, seed=seed, timeout=timeout))


async def run_engine(engine: Any, workload: Workload, *, concurrency: int | None, rate: float | None,
                     seed: int = 0) -> dict[str, Any]:
    """The same workload through Engine.submit in this process (the baseline for the HTTP overhead)."""
    from internlm_jax.engine import SamplingParams

    async def one(i: int) -> RequestResult:
        prompt = workload.prompts[i]
        res = RequestResult(False, len(prompt))
        sp = SamplingParams(max_tokens=workload.output_lens[i], temperature=0.0, ignore_eos=True)
        res.start = t0 = time.perf_counter()
        last = None
        async for ev in engine.submit(prompt, sp):
            if ev.token_id is not None:
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
                res.output_tokens += 1
        res.end = time.perf_counter()
        res.e2e = res.end - t0
        res.ok = res.output_tokens == workload.output_lens[i]
        return res

    results, _ = await _drive(workload, concurrency, rate, seed, one)
    return summarize(results)


MASK_SCHEMA = {  # rows cannot finish early: at least 64 records of varied fields (the grammar state keeps moving)
    "type": "array", "minItems": 64, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                                         "name": {"type": "string", "maxLength": 8},
                                         "kind": {"enum": ["user", "admin", "guest"]},
                                         "score": {"type": "number"}, "ok": {"type": "boolean"}},
        "required": ["id", "name", "kind", "score", "ok"]}}


def mask_overhead(engine: Any, *, batch: int = 16, constrained: int = 8, tokens: int = 64, repeats: int = 3,
                  prompt_len: int = 32) -> dict[str, Any]:
    """Step time with `constrained` of `batch` rows under MASK_SCHEMA over the same step with all rows free.

    Every row generates exactly `tokens` tokens at temperature 1 (free rows ignore EOS; the grammar cannot
    complete in time), so both runs take the same steps; the runs alternate `repeats` times and the
    median per-step times are compared."""
    from internlm_jax.grammar import GrammarSpec
    from internlm_jax.sampling import SamplingParams

    if not 0 <= constrained <= batch:
        raise ValueError(f"constrained rows must be in [0, {batch}], got {constrained}")
    vocab = engine.config.vocab_size
    rng = random.Random(0)
    prompts = [[1] + [rng.randint(min(260, vocab // 4), vocab - 8) for _ in range(prompt_len - 1)]
               for _ in range(batch)]
    spec = GrammarSpec.json_schema(MASK_SCHEMA)
    free = [SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=i) for i in range(batch)]
    mixed = [SamplingParams(temperature=1.0, max_tokens=tokens, seed=i, grammar=spec) if i < constrained
             else free[i] for i in range(batch)]

    def run(params: list[Any]) -> tuple[float, float, int]:
        steps0, mask0, t0 = engine.steps, engine.runner.mask_seconds, time.perf_counter()
        outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        n = engine.steps - steps0
        for o, sp in zip(outs, params):
            if sp.grammar is not None and o.outputs[0].finish_reason != "length":
                raise RuntimeError(f"a constrained row finished early ({o.outputs[0].finish_reason})")
        return wall / n, (engine.runner.mask_seconds - mask0) / n, n

    run(mixed[:2] + free[2:])  # warm: the grammar compiles, first-use paths run
    times: dict[str, list[float]] = {"free": [], "mixed": [], "mask": []}
    for _ in range(repeats):
        times["free"].append(run(free)[0])
        step, mask, steps = run(mixed)
        times["mixed"].append(step)
        times["mask"].append(mask)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"batch": batch, "constrained_rows": constrained, "steps": steps, "free_step_ms": 1e3 * med["free"],
            "mixed_step_ms": 1e3 * med["mixed"], "mask_ms_per_step": 1e3 * med["mask"],
            "mask_us_per_row": 1e6 * med["mask"] / max(1, constrained),
            "ratio": med["mixed"] / med["free"], "mask_share": med["mask"] / med["free"],
            "compilations": engine.stats()["compilations"]}


def format_summary(title: str, s: dict[str, Any]) -> str:
    lines = [f"== {title} ==",
             f"  requests ok / failed       {s['completed']} / {s['failed']}",
             f"  duration                   {s['duration_s']:.2f} s",
             f"  request throughput         {s['request_throughput']:.2f} req/s",
             f"  input token throughput     {s['input_tok_s']:.1f} tok/s",
             f"  output token throughput    {s['output_tok_s']:.1f} tok/s"]
    for key, label, unit in (("ttft_ms", "TTFT", "ms"), ("itl_ms", "ITL", "ms"), ("e2e_s", "E2E", "s")):
        v = s[key]
        lines.append(f"  {label:<5} {unit:<3} mean {v['mean']:9.2f}  p50 {v['p50']:9.2f}  p90 {v['p90']:9.2f}  "
                     f"p99 {v['p99']:9.2f}  min {v['min']:9.2f}  max {v['max']:9.2f}")
    if "first_error" in s:
        lines.append(f"  first error: {s['first_error']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from internlm_jax.serve.loading import add_model_args

    p = argparse.ArgumentParser(prog="internlm-jax bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, required=False)
    g = p.add_argument_group("load")
    g.add_argument("--url", default=None, help="benchmark a running server (else --model starts one here)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--num-prompts", type=int, default=256)
    g.add_argument("--input-len", type=int, default=256)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in mean * [1-r, 1+r]")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight (0: no cap)")
    g.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (default: all "
                   "at once, limited by --concurrency)")
    g.add_argument("--vocab-size", type=int, default=None, help="with --url: ids are drawn below this")
    g.add_argument("--workload-seed", type=int, default=0)
    g.add_argument("--engine-tok-s", type=float, default=None, help="with --url: the engine's in-process "
                   "output tok/s to compare against")
    g.add_argument("--no-engine-baseline", action="store_true", help="with --model: skip the in-process run")
    g.add_argument("--client-procs", type=int, default=default_client_procs(),
                   help="client processes sharing the load (default: one per 4 cores, at most 4)")
    g.add_argument("--client-in-process", action="store_true",
                   help="with --model: run the HTTP client in this process too (shares the GIL with the server)")
    g.add_argument("--json", default=None, help="write the results here")
    g.add_argument("--mask-overhead", action="store_true", help="with --model: measure constrained decoding "
                   "(step time at batch 16, half the rows under a JSON-schema grammar, over all rows free) "
                   "instead of the HTTP workload")
    return p


def _client_child(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    wl = Workload(job["prompts"], job["output_lens"])
    results = asyncio.run(http_results(job["url"], wl, model=job["model"], concurrency=job["concurrency"],
                                       rate=job["rate"], api_key=job.get("api_key"), seed=job["seed"],
                                       indices=job["indices"]))
    with open(job["out"], "w") as f:
        json.dump([dataclasses.asdict(r) for r in results], f)
    return 0


def default_client_procs() -> int:
    """Client processes: one per 4 host cores, at most 4 (httpx costs ~0.1-0.2 ms of CPU per streamed chunk)."""
    return max(1, min(4, (os.cpu_count() or 2) // 4))


def http_in_children(url: str, wl: Workload, *, model: str, concurrency: int | None, rate: float | None,
                     seed: int, api_key: str | None, procs: int) -> dict[str, Any]:
    """The HTTP run from `procs` child processes (requests dealt round-robin, concurrency and rate split)."""
    procs = max(1, min(procs, len(wl.prompts)))
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        env = dict(os.environ, JAX_PLATFORMS="cpu")  # the client never touches an accelerator
        for k in range(procs):
            job, out = os.path.join(tmp, f"job{k}.json"), os.path.join(tmp, f"out{k}.json")
            with open(job, "w") as f:
                json.dump({"url": url, "prompts": wl.prompts, "output_lens": wl.output_lens, "model": model,
                           "indices": list(range(k, len(wl.prompts), procs)),
                           "concurrency": -(-concurrency // procs) if concurrency else None,
                           "rate": rate / procs if rate else None, "seed": seed + k, "api_key": api_key,
                           "out": out}, f)
            # Run this file as a script: the child needs only asyncio + httpx, not the package (jax, ...).
            children.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client-only", job],
                                              env=env), out))
        results: list[RequestResult] = []
        for proc, out in children:
            if proc.wait() != 0:
                raise RuntimeError(f"a benchmark client process failed with exit code {proc.returncode}")
            with open(out) as f:
                results += [RequestResult(**r) for r in json.load(f)]
    return summarize(results)


def _model_of(url: str, api_key: str | None) -> str:
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    r = httpx.get(base + "/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--client-only"] and len(argv) == 2:  # a client child process (see http_in_children)
        return _client_child(argv[1])
    args = build_parser().parse_args(argv)
    from internlm_jax.config import ConfigError

    if not args.url and not args.model:
        print("internlm-jax bench serve: give --url (a running server) or --model (start one here)", file=sys.stderr)
        return 2
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or not 0 <= args.range_ratio < 1:
        print("internlm-jax bench serve: --num-prompts, --input-len, --output-len must be >= 1 and --range-ratio in "
              "[0, 1)", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"config": vars(args)}
    mode = (f"concurrency {args.concurrency or 'unbounded'}" +
            (f", rate {args.request_rate}/s" if args.request_rate else ""))
    if args.url:
        vocab = args.vocab_size or 1024
        wl = Workload.random(args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab,
                             args.workload_seed)
        if args.client_procs > 1:
            model = args.served_model_name or _model_of(args.url, args.api_key)
            http = http_in_children(args.url, wl, model=model, concurrency=args.concurrency or None,
                                    rate=args.request_rate, seed=args.workload_seed, api_key=args.api_key,
                                    procs=args.client_procs)
        else:
            http = asyncio.run(run_http(args.url, wl, model=args.served_model_name,
                                        concurrency=args.concurrency or None, rate=args.request_rate,
                                        api_key=args.api_key, seed=args.workload_seed))
        report["http"] = http
        print(format_summary(f"HTTP {args.url} ({mode})", http))
        if args.engine_tok_s:
            report["http_over_engine"] = http["output_tok_s"] / args.engine_tok_s
            print(f"HTTP / engine output tok/s: {report['http_over_engine']:.3f}")
    else:
        from internlm_jax.serve.backend import ServeConfig
        from internlm_jax.serve.loading import build_engine, load_lm
        from internlm_jax.serve.testing import serve_in_thread

        try:
            lm, _ = load_lm(args)
            args.max_context = args.max_context or None
            engine = build_engine(lm, args)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"internlm-jax bench serve: {e}", file=sys.stderr)
            return 2
        if args.mask_overhead:
            try:
                r = mask_overhead(engine)
            finally:
                engine.shutdown()
            print(f"constrained decoding, batch {r['batch']} ({r['constrained_rows']} rows under a JSON schema), "
                  f"{r['steps']} steps: free step {r['free_step_ms']:.2f} ms, mixed step {r['mixed_step_ms']:.2f} ms, "
                  f"masks {r['mask_ms_per_step']:.3f} ms/step ({r['mask_us_per_row']:.0f} us/row); "
                  f"ratio {r['ratio']:.3f} (target < 1.10; mask time / free step {r['mask_share']:.3f}, the part of the "
                  f"ratio that host contention does not blur); compilations after warm-up {r['compilations']}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"config": vars(args), "mask_overhead": r}, f, indent=2, default=str)
            return 0
        wl = Workload.random(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                             lm.config.vocab_size, args.workload_seed)
        longest = max(len(p) + o for p, o in zip(wl.prompts, wl.output_lens))
        if longest > engine.max_model_len:
            print(f"internlm-jax bench serve: a request needs {longest} tokens, over --max-context "
                  f"{engine.max_model_len}; lower --input-len/--output-len", file=sys.stderr)
            return 2
        try:
            warm = Workload(wl.prompts[:4], [4] * min(4, len(wl.prompts)))
            asyncio.run(run_engine(engine, warm, concurrency=4, rate=None))  # first-use paths out of the timing
            if not args.no_engine_baseline:
                base = asyncio.run(run_engine(engine, wl, concurrency=args.concurrency or None,
                                              rate=args.request_rate, seed=args.workload_seed))
                report["engine"] = base
                print(format_summary(f"engine in-process ({mode})", base))
            name = args.served_model_name or "bench"
            with serve_in_thread(engine, lm.tokenizer, ServeConfig(model_name=name, max_queue=max(
                    1024, args.num_prompts))) as (url, backend):
                if args.client_in_process:
                    http = asyncio.run(run_http(url, wl, model=name, concurrency=args.concurrency or None,
                                                rate=args.request_rate, seed=args.workload_seed))
                else:
                    http = http_in_children(url, wl, model=name, concurrency=args.concurrency or None,
                                            rate=args.request_rate, seed=args.workload_seed, api_key=args.api_key,
                                            procs=args.client_procs)
                report["server_stats"] = backend.stats()
            report["http"] = http
            print(format_summary(f"HTTP ({mode})", http))
            if "engine" in report and report["engine"]["output_tok_s"]:
                report["http_over_engine"] = http["output_tok_s"] / report["engine"]["output_tok_s"]
                print(f"HTTP / engine output tok/s: {report['http_over_engine']:.3f}  (target >= 0.90)")
            print(f"engine compilations after warm-up: {report['server_stats']['compilations']}")
        finally:
            engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    failed = report["http"]["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
