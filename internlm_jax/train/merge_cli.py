"""`internlm-jax convert merge`: LoRA adapters + base weights -> one HF InternLM2 folder.

    internlm-jax convert merge --base /models/internlm2-chat-7b --adapter runs/qlora/adapter --out runs/qlora/hf
                               [--dtype bfloat16] [--qlora-group-size 64] [--tokenizer DIR]

--base:    an HF folder or an internlm-jax params checkpoint.
--adapter: an HF PEFT folder (adapter_config.json + adapter_model.safetensors), our orbax adapter folder, or a
           fine-tuning run folder (its adapter/ is used).
--qlora-group-size: the adapters were trained on an int4 base (mode: qlora); quantise the base the same way
           (round to nearest, groups of this size) before merging, so the export computes exactly what was
           trained. Without it the adapters are added to the original dense weights, as XTuner / PEFT do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internlm-jax convert merge",
                                description="Merge LoRA adapters into base weights and write an HF folder.")
    p.add_argument("--base", required=True, help="base model: HF folder or internlm-jax params checkpoint")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder, orbax adapter folder or finetune run")
    p.add_argument("--out", required=True, help="write the merged HF folder here")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="storage dtype of the output")
    p.add_argument("--tokenizer", help="copy tokenizer files from here (default: the base folder's)")
    p.add_argument("--qlora-group-size", type=int, default=0,
                   help="quantise the base to int4 (groups of N) first, as the QLoRA run did")
    p.add_argument("--qlora-symmetric", action="store_true", help="the QLoRA base had no zero points")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def merge_to_hf(base: str, adapter: str, out: str, *, dtype: str | None = None, tokenizer: str | None = None,
                qlora_group_size: int = 0, qlora_zero_point: bool = True, overwrite: bool = False,
                progress: bool = True) -> str:
    from internlm_jax.checkpoint.errors import CheckpointError
    from internlm_jax.peft import load_adapters, merge_adapters
    from internlm_jax.train.finetune import export_hf

    if not os.path.isdir(base):
        raise CheckpointError(f"--base {base} is not a folder (an HF checkpoint or an internlm-jax params checkpoint)")
    if os.path.isdir(os.path.join(adapter, "adapter")):
        adapter = os.path.join(adapter, "adapter")  # a fine-tuning run folder
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise CheckpointError(f"{out} already exists; choose a new folder or pass --overwrite")
    if os.path.exists(os.path.join(base, "config.json")):
        from internlm_jax.checkpoint.hf import load_hf

        config, params = load_hf(base, progress=progress)
    else:
        from internlm_jax.checkpoint.orbax_io import restore_params

        config, params = restore_params(base)
    adapters = load_adapters(adapter, config)
    if qlora_group_size:
        from internlm_jax.quant.int4 import LAYER_TARGETS, quantize_params

        params = quantize_params(params, config, group_size=qlora_group_size, zero_point=qlora_zero_point,
                                 targets=LAYER_TARGETS)
    merged = merge_adapters(params, adapters)
    if tokenizer is None and os.path.exists(os.path.join(base, "tokenizer.model")):
        tokenizer = base
    return export_hf(out, merged, config, tokenizer_dir=tokenizer, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from internlm_jax.config import ConfigError

    start = time.perf_counter()
    try:
        out = merge_to_hf(args.base, args.adapter, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                          qlora_group_size=args.qlora_group_size, qlora_zero_point=not args.qlora_symmetric,
                          overwrite=args.overwrite, progress=not args.quiet)
    except ConfigError as e:  # CheckpointError included: shapes that do not fit, missing files
        print(f"internlm-jax convert merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged {args.adapter} into {args.base} -> {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
