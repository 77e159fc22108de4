"""`internlm-jax data prepare` and `internlm-jax data bench`.

    internlm-jax data prepare --config configs/data/tiny_prepare.yaml [key=value ...] [--runner DataflowRunner]
                              [--workers 2] [-- <Beam pipeline options>]
    internlm-jax data bench --size-mb 100 --workers 2
"""

from __future__ import annotations

import argparse
import sys

from internlm_jax.config import ConfigError


def _prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internlm-jax data prepare",
                                description="Filter, deduplicate, tokenize and shard a raw corpus on Apache Beam.")
    p.add_argument("--config", required=True, help="YAML prepare config (see configs/data/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. dedup.near.threshold=0.7")
    p.add_argument("--runner", help="Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...); "
                                    "same as runner.name=...")
    p.add_argument("--workers", type=int, help="DirectRunner worker count; same as runner.workers=...")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def prepare_main(argv: list[str]) -> int:
    beam_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, beam_args = argv[:i], argv[i + 1:]
    args = _prepare_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.runner:
        overrides.append(f"runner.name={args.runner}")
    if args.workers is not None:
        overrides.append(f"runner.workers={args.workers}")
        overrides.append("runner.direct_running_mode=" + ("multi_processing" if args.workers > 1 else "in_memory"))
    from internlm_jax.data.prepare.config import load_prepare_config
    from internlm_jax.data.sources import DataError

    try:
        cfg = load_prepare_config(args.config, overrides)
        if args.print_config:
            from internlm_jax.runconfig import dump_yaml

            print(dump_yaml(cfg), end="")
            return 0
        try:
            from internlm_jax.data.prepare.pipeline import run
        except ModuleNotFoundError as e:
            if e.name not in ("apache_beam", "datasketch"):
                raise
            print(f"internlm-jax data prepare: {e.name} is not installed; pip install -e \".[data]\"",
                  file=sys.stderr)
            return 2
        out = run(cfg, beam_args)
    except (ConfigError, DataError) as e:
        print(f"internlm-jax data prepare: {e}", file=sys.stderr)
        return 2
    t = out["manifest"]["totals"]
    print(f"prepared {t['docs_out']:,} of {t['docs_in']:,} documents, {t['tokens']:,} tokens, {t['shards']} shards "
          f"in {out['wall_s']:.1f}s -> {cfg.output_dir}/manifest.json (card: card.md, card.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: internlm-jax data {prepare,bench} ...\n\n"
              "  prepare  filter, deduplicate, tokenize and shard a raw corpus (Apache Beam)\n"
              "  bench    documents/s and tokens/s of `prepare` on a synthetic corpus")
        return 0
    if argv[0] == "prepare":
        return prepare_main(argv[1:])
    if argv[0] == "bench":
        from internlm_jax.data.prepare.bench import main as bench_main

        return bench_main(argv[1:])
    print(f"internlm-jax data: unknown subcommand {argv[0]!r} (prepare, bench)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
