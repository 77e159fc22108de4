"""`internlm-jax serve`: an OpenAI-compatible HTTP server (a drop-in for `lmdeploy serve api_server`).

    internlm-jax serve --model /ckpt/internlm2-chat-7b --dtype bfloat16 --port 23333 --api-keys sk-1
    internlm-jax serve --model internlm2-tiny --tokenizer /tmp/tok      # random weights, for testing
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

from internlm_jax.config import ConfigError

API_KEYS_ENV = "INTERNLM_JAX_API_KEYS"


def build_parser() -> argparse.ArgumentParser:
    from internlm_jax.serve.loading import add_model_args

    p = argparse.ArgumentParser(prog="internlm-jax serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("http")
    g.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)")
    g.add_argument("--port", type=int, default=23333)
    g.add_argument("--api-keys", nargs="+", default=None,
                   help="accepted keys (clients send 'Authorization: Bearer <key>'); space or comma separated. "
                        f"Keys also come from --api-keys-file and ${API_KEYS_ENV} (comma separated); keeping them "
                        "off the command line keeps them out of `ps`")
    g.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="a file of accepted keys, one per line ('#' starts a comment)")
    g.add_argument("--open-metrics", action="store_true",
                   help="serve /metrics without a key even when keys are set (for a Prometheus scraper); "
                        "/docs and /openapi.json always need the key then")
    g.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="parse special-token names ('<|im_start|>' ...) inside chat messages and tools into "
                        "control tokens. Only for trusted clients: anyone can then forge a system turn. "
                        "Default: such names are plain text")
    g.add_argument("--served-model-name", default=None, help="the model id clients use (default: folder name)")
    g.add_argument("--cors-origins", default=None, help="comma-separated allowed origins, e.g. '*'")
    g.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait beyond --max-batch; more get 429")
    g.add_argument("--max-body-mb", type=float, default=8.0, help="largest accepted request body")
    g.add_argument("--no-warmup-scoring", action="store_true",
                   help="do not compile the prompt-logprob forward (echo + logprobs, what lm-eval uses) for every "
                        "length bucket at start-up; such requests then compile on first use (seconds)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: stop admitting (503) and give open requests this many seconds to finish, then "
                        "end each open stream with an error event")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _split(values: list[str] | None) -> tuple[str, ...]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return tuple(out)


def gather_api_keys(cli_keys: list[str] | None, keys_file: str | None,
                    environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The accepted keys: --api-keys, the lines of --api-keys-file and ${API_KEYS_ENV}, in that order,
    without repeats. ConfigError for a file that cannot be read or holds no key (an empty key file would
    silently leave the server open)."""
    keys = list(_split(cli_keys))
    if keys_file is not None:
        try:
            with open(keys_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--api-keys-file {keys_file!r} cannot be read ({e}); give a UTF-8 text file "
                              "with one key per line") from None
        from_file = [k for k in (line.split("#", 1)[0].strip() for line in lines) if k]
        if not from_file:
            raise ConfigError(f"--api-keys-file {keys_file!r} holds no key; put one key per line (or leave the "
                              "flag out to serve without keys)")
        for k in from_file:
            if any(c.isspace() for c in k):
                raise ConfigError(f"--api-keys-file {keys_file!r}: a key may not contain spaces; write one key "
                                  "per line")
        keys += from_file
    keys += _split([(os.environ if environ is None else environ).get(API_KEYS_ENV, "")])
    return tuple(dict.fromkeys(keys))


def main(argv: list[str] | None = None) -> int:
    import time

    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("internlm_jax.serve")
    from internlm_jax.serve.app import create_app
    from internlm_jax.serve.backend import Backend, ServeConfig
    from internlm_jax.serve.loading import build_engine, load_lm
    from internlm_jax.serve.server import serve_forever

    try:
        if args.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
        if args.max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
        api_keys = gather_api_keys(args.api_keys, args.api_keys_file)
        log.info("loading %s ...", args.model)
        lm, random_weights = load_lm(args)
        engine = build_engine(lm, args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"internlm-jax serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninternlm-jax serve: interrupted while starting", file=sys.stderr)
        return 130
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    cfg = ServeConfig(model_name=name, api_keys=api_keys, max_queue=args.max_queue,
                      max_body_bytes=int(args.max_body_mb * (1 << 20)), cors_origins=_split([args.cors_origins] if
                                                                                          args.cors_origins else []),
                      random_weights=random_weights,
                      allow_special_tokens_in_content=args.allow_special_tokens_in_content,
                      open_metrics=args.open_metrics)
    backend = Backend(engine, lm.tokenizer, cfg)
    if not args.no_warmup_scoring and not args.no_warmup:
        t0 = time.perf_counter()
        backend.scorer.warmup()
        log.info("warm-up: prompt-logprob forward (echo + logprobs) ready for %d shapes in %.1f s",
                 backend.scorer.compiles, time.perf_counter() - t0)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_keys:
        log.warning("listening on %s without API keys (--api-keys, --api-keys-file or $%s): anyone who can "
                    "reach this port can use the model", args.host, API_KEYS_ENV)
    if cfg.allow_special_tokens_in_content:
        log.warning("--allow-special-tokens-in-content: clients can write control tokens (and forge turns)")
    log.info("serving %r on http://%s:%d (web chat at /, OpenAI API at /v1)%s; started in %.1f s (step programs: "
             "%s)", name, args.host, args.port, " [RANDOM WEIGHTS]" if random_weights else "",
             time.perf_counter() - t_start, getattr(engine, "warmup_origin", "not compiled ahead"))
    try:
        serve_forever(create_app(backend), args.host, args.port, args.log_level, backend=backend,
                      drain_timeout=args.drain_timeout)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    finally:
        engine.shutdown()
    log.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
