"""`internlm-jax <command>`: a thin dispatcher; each command lives beside the code it drives."""

from __future__ import annotations

import importlib
import os
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
    "tools": ("internlm_jax.agent.cli:tools_main", "serve tools over HTTP or MCP (`tools serve --mcp`)"),
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


def _accelerator_present() -> bool:
    """A TPU, NVIDIA or AMD GPU attached to this machine (PCI vendor ids and device nodes, as JAX probes them)."""
    import glob

    if any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")):
        return True
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU VMs expose their chips here
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":  # Google: TPU chips
                    return True
        except OSError:
            continue
    return False


def quiet_platforms(environ: dict[str, str] | None = None) -> str | None:
    """On a machine without an accelerator, pin JAX to the CPU (JAX_PLATFORMS=cpu) unless the user chose.

    With libtpu installed (the `tpu` extra), JAX otherwise initialises the TPU plugin on every start, and on a
    CPU-only host libtpu prints an error block ('Failed to find host bounds', 'unexpected worker hostname',
    'No jellyfish device found') before falling back to the CPU. AOT compilation for a TPU topology (`plan`)
    does not need the TPU backend, so nothing is lost. On a TPU or GPU host nothing is changed.
    Returns the value set, or None."""
    env = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in env or "JAX_FORCE_TPU_INIT" in env or env.get("INTERNLM_JAX_KEEP_PLATFORMS"):
        return None
    if _accelerator_present():
        return None
    env["JAX_PLATFORMS"] = "cpu"
    return "cpu"


def _quiet_jax() -> None:
    """quiet_platforms() for this process (JAX reads JAX_PLATFORMS when imported, and `import internlm_jax`
    imports it: the config is updated too, as long as no backend has started) and for its children."""
    if quiet_platforms() is None or "jax" not in sys.modules:
        return
    try:
        from jax._src import xla_bridge

        started = bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # another JAX layout: leave the (already imported) config alone
        return
    if not started:
        import jax

        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


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
    _quiet_jax()
    target, _ = COMMANDS[name]
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("internlm_jax"):
            print(f"internlm-jax: command {name!r} is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(mod, fn_name)(rest) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C: one line (what was saved, where to resume), no traceback
        print(f"\ninternlm-jax {name}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
