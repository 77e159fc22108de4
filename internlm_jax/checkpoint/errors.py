"""The one error type of checkpoint I/O."""

from __future__ import annotations

from internlm_jax.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or written as asked; the message names the file or tensor and the fix."""
