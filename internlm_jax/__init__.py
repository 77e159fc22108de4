"""internlm-jax: the InternLM2 chain on JAX.

    import internlm_jax as ij
    lm = ij.load("/path/to/internlm2-chat-7b", dtype="bfloat16")
    lm.chat([{"role": "user", "content": "Hello"}])
"""
from internlm_jax.api import LM, Generation, context_limit, trained_context
from internlm_jax.config import PRESETS, ConfigError, ModelConfig, get_preset
from internlm_jax.loading import init, load
from internlm_jax.model import forward, init_cache, init_params, param_axes, param_shapes
from internlm_jax.sharding import MeshConfig, make_mesh, use_mesh

__all__ = ["LM", "Generation", "context_limit", "trained_context", "init", "load", "PRESETS", "ConfigError", "ModelConfig",
           "get_preset", "forward", "init_cache", "init_params", "param_axes", "param_shapes", "MeshConfig",
           "make_mesh", "use_mesh"]
__version__ = "0.1.0"
