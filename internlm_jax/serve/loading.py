"""Model + tokenizer + Engine from command-line options (shared by `serve`, `chat` and `bench serve`).

`--model` is an InternLM2 HF folder, an internlm-jax orbax checkpoint, an int4 checkpoint written by
`internlm-jax quantize`, or a preset name (random weights: for testing only, logged loudly).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from internlm_jax.config import PRESETS, ConfigError

log = logging.getLogger("internlm_jax.serve")

CACHE_ENV = "INTERNLM_JAX_CACHE"
DEFAULT_CACHE = "~/.cache/internlm-jax/jax"

# Persistent-cache hits and misses in this process (jax.monitoring events), for the ready line.
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
CACHE_COUNTS = {"hits": 0, "misses": 0}
_listening = False


def _on_event(event: str, *args: Any, **kwargs: Any) -> None:
    if event in _CACHE_EVENTS:
        CACHE_COUNTS[_CACHE_EVENTS[event]] += 1


def compilation_cache_dir(args: argparse.Namespace, environ: Any = None) -> str | None:
    """The persistent-cache folder for these options: --compilation-cache, else $INTERNLM_JAX_CACHE, else
    ~/.cache/internlm-jax/jax; None with --no-compilation-cache (or the variable set to `off`)."""
    if getattr(args, "no_compilation_cache", False):
        return None
    env = os.environ if environ is None else environ
    chosen = getattr(args, "compilation_cache", None) or env.get(CACHE_ENV) or DEFAULT_CACHE
    if chosen.strip().lower() in ("off", "none", "0", "false"):
        return None
    return os.path.abspath(os.path.expanduser(chosen))


def enable_compilation_cache(path: str | None) -> str | None:
    """Point JAX's persistent compilation cache at `path` (created) before anything compiles: JAX decides
    once per process, at its first compile, whether the cache is used. Returns the path, or None when it is
    disabled or cannot be created (a warning then; serving works without it)."""
    global _listening
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache %s cannot be created (%s); compiling without it", path, e)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    return path


class WarmupReporter:
    """Logs engine warm-up as it goes: which program of how many, and the time so far (at most one line every
    few seconds, plus the first and the last)."""

    def __init__(self, every_s: float = 5.0, emit: Any = None):
        self.every_s, self.emit = every_s, emit or log.info
        self._last = -1e9

    def __call__(self, i: int, n: int, key: Any, elapsed: float) -> None:
        if i >= n:
            self.emit(f"warm-up: {n} programs ready in {elapsed:.1f} s")
            return
        if i == 0 or elapsed - self._last >= self.every_s:
            what = f"step B={key[0]} T={key[1]} W={key[2]}" if key else "slot reset"
            self.emit(f"warm-up: compiling program {i + 1}/{n} ({what}), {elapsed:.0f} s so far")
            self._last = elapsed


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", required=required,
                   help="HF folder | internlm-jax checkpoint | int4 checkpoint | preset name (random weights)")
    g.add_argument("--tokenizer", default=None, help="folder with tokenizer.model + tokenizer_config.json "
                   "(default: the model folder)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute/storage dtype (default: the checkpoint's; bfloat16 halves memory)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (devices sharing the model)")
    g.add_argument("--quant", default="none", choices=["none", "int4"], help="quantize weights at load")
    g.add_argument("--quant-group-size", type=int, default=128, help="int4 group size along the input dim")
    g.add_argument("--kv-int8", action="store_true", help="int8 KV cache (per-token, per-head scales)")
    g.add_argument("--max-batch", type=int, default=64, help="sequences decoding together (decode slots)")
    g.add_argument("--num-pages", "--page-budget", dest="num_pages", type=int, default=None,
                   help="KV pages in the pool (default: from free device memory)")
    g.add_argument("--page-size", type=int, default=64, help="tokens per KV page")
    g.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step (default: max(512, 2 * max-batch))")
    g.add_argument("--chunk-size", type=int, default=None, help="longest prefill chunk")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--seed", type=int, default=0, help="random-weight seed for presets; default sampling seed")
    g.add_argument("--no-warmup", action="store_true", help="compile on first use instead of at start-up")
    g.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="JAX persistent compilation cache: a second start of the same model loads its compiled "
                        f"programs from here instead of compiling (default: ${CACHE_ENV} or {DEFAULT_CACHE}; "
                        f"{CACHE_ENV}=off disables it)")
    g.add_argument("--no-compilation-cache", action="store_true", help="compile everything at every start")
    g.add_argument("--engine-buckets", default=None, help="advanced: 'decode=1,8,64;prefill=1,4;chunks=64,512;"
                   "widths=8,64' bucket sizes for the compiled step shapes")


def _mesh(tp: int) -> Any:
    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    if tp == 1:
        return None
    import jax

    from internlm_jax.sharding import MeshConfig, make_mesh

    devices = jax.devices()
    if len(devices) < tp:
        raise ConfigError(f"--tp {tp} needs {tp} devices but only {len(devices)} are visible")
    return make_mesh(MeshConfig(data=1, fsdp=1, sequence=1, tensor=tp), devices=devices[:tp])


def load_lm(args: argparse.Namespace) -> tuple[Any, bool]:
    """(LM, random_weights) for --model / --tokenizer / --dtype / --tp / --quant / --max-context."""
    import internlm_jax as ij

    args.compilation_cache_path = enable_compilation_cache(compilation_cache_dir(args))
    path = os.fspath(args.model)
    random_weights = not os.path.exists(path) and path in PRESETS
    if random_weights:
        log.warning("=" * 78)
        log.warning("--model %s is a preset: serving RANDOM WEIGHTS (for testing only; replies are noise)", path)
        log.warning("=" * 78)
    lm = ij.load(path, dtype=args.dtype, mesh=_mesh(args.tp), tokenizer=args.tokenizer, quant=args.quant,
                 quant_group_size=args.quant_group_size, max_context=args.max_context,
                 random_weights=True, seed=args.seed)
    if lm.tokenizer is None:
        log.warning("no tokenizer: only token-id prompts to /v1/completions will work (pass --tokenizer DIR)")
    if args.quant == "int4":
        log.info("weights quantized to int4 (group size %d)", args.quant_group_size)
    return lm, random_weights


def _buckets(spec: str | None) -> dict[str, tuple[int, ...]]:
    if not spec:
        return {}
    names = {"decode": "decode_batch_buckets", "prefill": "prefill_batch_buckets", "chunks": "chunk_buckets",
             "widths": "width_buckets"}
    out = {}
    for part in spec.split(";"):
        key, _, vals = part.partition("=")
        if key.strip() not in names:
            raise ConfigError(f"--engine-buckets: unknown key {key!r}; use {', '.join(names)}")
        try:
            out[names[key.strip()]] = tuple(int(v) for v in vals.split(","))
        except ValueError:
            raise ConfigError(f"--engine-buckets: {part!r} is not key=int,int,...") from None
    return out


def build_engine(lm: Any, args: argparse.Namespace, progress: Any = None) -> Any:
    """The Engine for these options, warmed up with progress lines (`progress(i, n, key, elapsed)`, default:
    WarmupReporter logging) and one ready line that says whether programs came from the persistent cache."""
    from internlm_jax.api import context_limit
    from internlm_jax.engine import Engine, EngineConfig

    # Default: the trained context, capped at max_position_embeddings (dynamic NTK past it is opt-in);
    # --max-context N was applied at load (a warning above the trained range) and is the limit then.
    max_len = args.max_context or min(context_limit(lm.config), lm.config.max_position_embeddings)
    batched = args.max_num_batched_tokens or max(512, 2 * args.max_batch)
    buckets = _buckets(args.engine_buckets)
    extra: dict[str, Any] = {}
    if "prefill_batch_buckets" in buckets:  # explicit buckets also bound what the scheduler may ask for
        extra["max_prefill_rows"] = min(4, max(buckets["prefill_batch_buckets"]))
    chunk = args.chunk_size
    if chunk is None and "chunk_buckets" in buckets:
        chunk = max(buckets["chunk_buckets"])
    ec = EngineConfig(page_size=args.page_size, num_pages=args.num_pages, kv_dtype="int8" if args.kv_int8 else "auto",
                      max_num_seqs=args.max_batch, max_model_len=max_len, max_num_batched_tokens=batched,
                      chunk_size=chunk, enable_prefix_caching=not args.no_prefix_caching,
                      warmup=not args.no_warmup, seed=args.seed, eos_token_ids=(lm.config.eos_token_id,),
                      **buckets, **extra)
    from internlm_jax.engine.runner import warmup_progress

    cache = getattr(args, "compilation_cache_path", None)
    if cache and not args.no_warmup:
        log.info("warm-up: compiling the engine's step programs (persistent cache %s)", cache)
    elif not args.no_warmup:
        log.info("warm-up: compiling the engine's step programs (no persistent cache)")
    before = dict(CACHE_COUNTS)
    with warmup_progress(progress or WarmupReporter()):
        engine = Engine(lm.params, lm.config, ec, tokenizer=lm.tokenizer, mesh=lm.mesh)
    hits = CACHE_COUNTS["hits"] - before["hits"]
    misses = CACHE_COUNTS["misses"] - before["misses"]
    st = engine.stats()
    if not cache:
        origin = "compiled (persistent cache off)"
    elif hits and not misses:
        origin = f"all loaded from the compilation cache, {hits} hits"
    else:  # hits/misses count every XLA program the engine built (the step buckets and a few small ones)
        origin = f"compilation cache: {hits} hits, {misses} compiled and stored"
    engine.warmup_origin = origin
    from internlm_jax.kv_cache import page_bytes

    pool_tokens = st["pages_total"] * st["page_size"]
    pool_mib = st["pages_total"] * page_bytes(lm.config, st["page_size"], ec.kv_dtype) / 2**20
    log.info("engine ready: longest request %d tokens (prompt + output); KV pool %d tokens (%d pages x %d, %.1f "
             "MiB%s); %d decode slots; warm-up %.1f s (%d programs: %s)", min(engine.max_model_len, pool_tokens),
             pool_tokens, st["pages_total"], st["page_size"], pool_mib, ", int8" if args.kv_int8 else "",
             args.max_batch, st["warmup_seconds"], st["warmup_compilations"], origin)
    return engine


__all__ = ["CACHE_ENV", "WarmupReporter", "add_model_args", "build_engine", "compilation_cache_dir",
           "enable_compilation_cache", "load_lm"]
