"""LoRA / QLoRA: `LoraWeight`, `apply_lora`, `trainable_mask`, merge / split, adapter files (PEFT safetensors
or orbax), and parameter-memory reports."""

from internlm_jax.peft.io import load_adapters, peft_name, save_adapters
from internlm_jax.peft.lora import (
                                    LoraWeight,
                                    apply_lora,
                                    enable_dropout,
                                    is_adapter_path,
                                    lora_summary,
                                    merge_adapters,
                                    merge_lora,
                                    merged_weight,
                                    split_adapters,
                                    trainable_mask,
)
from internlm_jax.peft.memory import format_memory_table, memory_comparison, param_memory_report

__all__ = ["LoraWeight", "apply_lora", "enable_dropout", "format_memory_table", "is_adapter_path", "load_adapters",
           "lora_summary", "memory_comparison", "merge_adapters", "merge_lora", "merged_weight", "param_memory_report",
           "peft_name", "save_adapters", "split_adapters", "trainable_mask"]
