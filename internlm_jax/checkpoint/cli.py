"""`internlm-jax convert`: HF folder <-> internlm-jax (orbax) checkpoint, and export to Llama's layout.

    internlm-jax convert --from-hf DIR --to CKPT [--dtype bfloat16]
    internlm-jax convert --from CKPT --to-hf DIR [--tokenizer DIR] [--dtype bfloat16] [--max-shard-size 2GB]
    internlm-jax convert --from-hf DIR | --from CKPT --to-llama DIR [--tokenizer DIR] [--dtype ...]
        (a LlamaForCausalLM folder, like InternLM's convert2llama; --from-hf copies DIR's tokenizer files)
    internlm-jax convert merge ...      (LoRA adapters into base weights; see SUBCOMMANDS)
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time

from internlm_jax.config import ConfigError

# Subcommands that live with the code they drive: name -> ("module:function", help). Each takes argv.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("internlm_jax.peft.merge_cli:main", "merge LoRA adapters into the base weights"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="internlm-jax convert",
        description="Convert between an InternLM2 HF folder and an internlm-jax checkpoint. Subcommands: "
                    + ", ".join(f"`convert {k}` ({v[1]})" for k, v in SUBCOMMANDS.items()))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF folder (config.json + safetensors or .bin)")
    src.add_argument("--from", dest="from_ckpt", metavar="CKPT", help="internlm-jax checkpoint folder")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to", metavar="CKPT", help="write an internlm-jax checkpoint here")
    dst.add_argument("--to-hf", metavar="DIR", help="write an HF folder here")
    dst.add_argument("--to-llama", metavar="DIR",
                     help="write a Llama HF folder here (transformers' LlamaForCausalLM loads it, no remote code)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="copy tokenizer files from this folder (with --to-hf or --to-llama)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="storage dtype of the output")
    p.add_argument("--max-shard-size", default="1GB",
                   help="largest safetensors shard with --to-hf / --to-llama (e.g. 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 500MB, 2GB or 1073741824")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _run_subcommand(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.from_hf and args.to_hf:
            raise ConfigError("--from-hf with --to-hf copies nothing useful; convert to --to CKPT instead")
        if args.from_ckpt and args.to:
            raise ConfigError("--from CKPT with --to CKPT: copy the folder instead")
        if args.tokenizer and not (args.to_hf or args.to_llama):
            raise ConfigError("--tokenizer only applies with --to-hf or --to-llama")
        start = time.perf_counter()
        if args.to_llama:
            summary = _to_llama(args)
        elif args.from_hf:
            summary = _hf_to_ckpt(args)
        else:
            summary = _ckpt_to_hf(args)
    except ConfigError as e:  # CheckpointError included: a clear message, no stack trace
        print(f"internlm-jax convert: error: {e}", file=sys.stderr)
        return 2
    print(f"{summary} in {time.perf_counter() - start:.1f}s")
    return 0


def _hf_to_ckpt(args: argparse.Namespace) -> str:
    from internlm_jax.checkpoint.hf import load_hf
    from internlm_jax.checkpoint.orbax_io import save_params

    config, params = load_hf(args.from_hf, dtype=args.dtype, progress=not args.quiet)
    save_params(args.to, params, config, extra={"converted_from": os.path.abspath(args.from_hf)},
                overwrite=args.overwrite)
    return (f"converted {args.from_hf} -> {args.to}: {config.num_params():,} params "
            f"({config.num_layers} layers, {config.param_dtype})")


def _ckpt_to_hf(args: argparse.Namespace) -> str:
    from internlm_jax.checkpoint.hf import save_hf
    from internlm_jax.checkpoint.orbax_io import restore_params

    config, params = restore_params(args.from_ckpt, dtype=args.dtype)
    save_hf(args.to_hf, params, config, tokenizer_dir=args.tokenizer, max_shard_bytes=parse_size(args.max_shard_size),
            overwrite=args.overwrite, progress=not args.quiet)
    return (f"converted {args.from_ckpt} -> {args.to_hf}: {config.num_params():,} params "
            f"({config.num_layers} layers, {config.param_dtype})")


def _to_llama(args: argparse.Namespace) -> str:
    from internlm_jax.checkpoint.llama import save_llama

    source = args.from_hf or args.from_ckpt
    if args.from_hf:
        from internlm_jax.checkpoint.hf import check_target, load_hf

        check_target(args.to_llama, args.overwrite)  # before the (long) load
        config, params = load_hf(args.from_hf, dtype=args.dtype, progress=not args.quiet)
    else:
        from internlm_jax.checkpoint.orbax_io import restore_params

        config, params = restore_params(args.from_ckpt, dtype=args.dtype)
    save_llama(args.to_llama, params, config, source_dir=args.from_hf, tokenizer_dir=args.tokenizer,
               max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite, progress=not args.quiet)
    return (f"converted {source} -> {args.to_llama} (LlamaForCausalLM): {config.num_params():,} params "
            f"({config.num_layers} layers, {config.param_dtype})")


def _run_subcommand(name: str, argv: list[str]) -> int:
    target, _ = SUBCOMMANDS[name]
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("internlm_jax"):
            print(f"internlm-jax convert: `{name}` is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    return int(getattr(mod, fn_name)(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
