"""`internlm-jax convert merge` is registered under this name in `internlm_jax.checkpoint.cli`; the command
itself lives with the fine-tuning code in `internlm_jax.train.merge_cli`."""

from internlm_jax.train.merge_cli import main

__all__ = ["main"]
