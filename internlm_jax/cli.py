"""`internlm-jax <command>`: a thin dispatcher; each command lives beside the code it drives."""

from __future__ import annotations

import importlib
import sys

# command -> "module:function"; each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("internlm_jax.checkpoint.cli:main", "HF folder <-> orbax checkpoint; `convert merge` for LoRA"),
    "train": ("internlm_jax.train.cli:main", "pre-train from a YAML config"),
    "finetune": ("internlm_jax.train.finetune_cli:main", "SFT / LoRA / QLoRA / DPO from a YAML config"),
    "eval": ("internlm_jax.evaluate.cli:main", "evaluate models x tasks"),
    "quantize": ("internlm_jax.quant.cli:main", "int4 weight quantization (RTN, AWQ)"),
    "serve": ("internlm_jax.serve.cli:main", "OpenAI-compatible HTTP server"),
    "chat": ("internlm_jax.serve.chat_cli:main", "interactive terminal chat"),
    "agent": ("internlm_jax.agent.cli:main", "interactive tool-using agent"),
    "reward": ("internlm_jax.train.reward:main", "reward model: `reward train` (Bradley-Terry), `reward score`"),
    "rl": ("internlm_jax.train.rl_cli:main", "online RL (GRPO / PPO): engine rollouts + train-step updates"),
    "plan": ("internlm_jax.train.plan:main", "AOT-compile a train step for a TPU topology"),
    "data": ("internlm_jax.data.prepare.cli:main", "prepare a corpus on Apache Beam: filter, dedup, tokenize, shard"),
    "bench": ("internlm_jax.bench:main", "benchmarks: train, engine, kernels, serve, long"),
    "demo": ("internlm_jax.demo:main", "the end-to-end demo: data -> train -> SFT -> eval -> int4 -> serve"),
}


def _usage() -> str:
    lines = ["usage: internlm-jax <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"internlm-jax: unknown command {name!r}" + (f"; did you mean {near[0]!r}?" if near else ""),
              file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("internlm_jax"):
            print(f"internlm-jax: command {name!r} is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    return int(getattr(mod, fn_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
