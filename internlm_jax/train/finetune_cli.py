"""`internlm-jax finetune --config configs/finetune/<name>.yaml [key=value ...]`: SFT / DPO, full / LoRA / QLoRA."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="internlm-jax finetune",
        description="Fine-tune from a YAML config (configs/finetune/*.yaml): chat SFT with the InternLM2 template "
                    "or DPO, with full weights, LoRA or QLoRA. key=value arguments override config keys; dotted "
                    "keys reach nested sections (lora.rank=16, dataset.seq_len=4096, dpo.beta=0.05).")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/finetune/tiny_sft.yaml")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="read and pack the data, print its report and the parameter memory table, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from internlm_jax.config import ConfigError
    from internlm_jax.runconfig import dump_yaml, load_config
    from internlm_jax.train.finetune_config import FinetuneConfig

    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        if args.dry_run:
            return _dry_run(cfg)
        from internlm_jax.train.finetune import finetune

        finetune(cfg)
    except ConfigError as e:  # CheckpointError included
        print(f"internlm-jax finetune: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError (file and line), TokenizerError
        if type(e).__name__ not in ("DataError", "TokenizerError"):
            raise
        print(f"internlm-jax finetune: {e}", file=sys.stderr)
        return 2
    return 0


def _dry_run(cfg) -> int:
    from internlm_jax.data.sft import PackedBatches
    from internlm_jax.peft import format_memory_table, memory_comparison
    from internlm_jax.train.finetune import build_model, prepare_data

    model = build_model(cfg)
    tokenizer, units, report, _ = prepare_data(cfg, model)
    batches = PackedBatches(units, cfg.dataset.seq_len, cfg.global_batch_size, pad_id=int(tokenizer.pad_id),
                            seed=cfg.seed, pack=cfg.dataset.pack, dpo=cfg.task == "dpo")
    rows = len(batches.rows_for_epoch(0))
    print(f"data: {report.summary()}")
    print(f"      {rows} rows of {cfg.dataset.seq_len} positions "
          f"({100 * sum(batches.lengths) / (rows * cfg.dataset.seq_len):.1f}% filled), "
          f"{batches.batches_per_epoch(0)} batches of {cfg.global_batch_size} per epoch")
    rows_mem = memory_comparison(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, group_size=cfg.qlora.group_size,
                                 targets=cfg.lora.targets, base_dtype=model.param_dtype, adapter_dtype=cfg.lora.dtype)
    print(format_memory_table(rows_mem, f"parameter memory of {cfg.model.name} (mode here: {cfg.mode})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
