"""internlm-jax: InternLM2 on JAX."""
from internlm_jax.config import ConfigError, ModelConfig, PRESETS, get_preset
from internlm_jax.model import forward, init_cache, init_params, param_axes, param_shapes

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "get_preset", "forward", "init_cache", "init_params",
           "param_axes", "param_shapes"]
__version__ = "0.1.0"
