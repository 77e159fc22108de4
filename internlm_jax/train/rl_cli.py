"""`internlm-jax rl --config configs/rl/<name>.yaml [key=value ...]`: online GRPO / PPO on the engine + train step.

`--plan --topology v5p:4x4x4` instead AOT-compiles the RL update step (policy + reference + value head shapes of
the config) for a TPU topology on a CPU host (needs libtpu, never a TPU) and prints its memory per device."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internlm-jax rl", description=__doc__)
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/rl/tiny_grpo.yaml")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--plan", action="store_true", help="AOT-compile the update step for --topology, then exit")
    p.add_argument("--topology", default="v5p:2x2x2", help="TPU topology for --plan, e.g. v5p:4x4x4")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from internlm_jax.config import ConfigError
    from internlm_jax.runconfig import dump_yaml, load_config
    from internlm_jax.train.rl_config import RLConfig

    try:
        cfg = load_config(RLConfig, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        if args.plan:
            from internlm_jax.train.plan import PlanError, get_topology
            from internlm_jax.train.rl_plan import plan_update

            try:
                devices = list(get_topology(args.topology).devices)
            except PlanError as e:
                print(f"internlm-jax rl: {e}", file=sys.stderr)
                return 2
            print(json.dumps(plan_update(cfg, devices)))
            return 0
        from internlm_jax.train.rl_loop import train_rl

        train_rl(cfg)
    except ConfigError as e:
        print(f"internlm-jax rl: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if type(e).__name__ not in ("DataError", "TokenizerError"):
            raise
        print(f"internlm-jax rl: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
