"""`internlm-jax train --config configs/pretrain/tiny.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from internlm_jax.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="internlm-jax train",
        description="Pre-train (or continue pre-training) from a YAML run config. Extra key=value arguments "
                    "override config keys; dotted keys reach nested sections (optimizer.lr=3e-4, mesh.fsdp=-1).")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/pretrain/tiny.yaml")
    p.add_argument("--init-from", default=None,
                   help="start from these weights (HF folder, internlm-jax checkpoint or run dir); same as "
                        "init_from=PATH")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from internlm_jax.runconfig import dump_yaml, load_config
    from internlm_jax.train.config import TrainConfig

    overrides = list(args.overrides)
    if args.init_from:
        overrides.append(f"init_from={args.init_from}")
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from internlm_jax.train.loop import train

        train(cfg)
    except ConfigError as e:
        print(f"internlm-jax train: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError (which file, which line), TokenizerError
        if type(e).__name__ not in ("DataError", "TokenizerError"):
            raise
        print(f"internlm-jax train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
