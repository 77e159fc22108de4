"""Model FLOPs for MFU, and the peak FLOP/s they are divided by.

Training FLOPs per token (the PaLM appendix-B convention, which MaxText also reports):

    flops/token = 6 * N_matmul + 12 * L * N * H * T

- N_matmul = L * (D*K*(G+2)*H + N*H*D + 3*D*F) + D*V: every weight that enters a matmul (packed qkv, wo, the
  three MLP matrices per layer, the output head). The input embedding is a gather (no FLOPs) and norms are
  elementwise, so neither counts. 6 = 2 (multiply-add) x 3 (forward, grad wrt activations, grad wrt weights).
- 12 * L * N * H * T: attention scores q k^T and the probs @ v, each 2*T*N*H FLOPs per token per layer in the
  forward pass, x3 for training. T is the row length; the full T x T score matrix is counted (as PaLM does and
  as the reference attention computes it), not the causal half, and packed rows count their full length.
- Rematerialisation is not counted (that would be hardware FLOPs utilisation, HFU): remat lowers MFU.

MFU = flops/token * tokens/s / peak FLOP/s of the devices used. Peak: `peak_tflops` from the config, else
the published dense bf16 peak of a known accelerator (compute dtype bf16/fp16), else the matmul FLOP/s
measured on this machine in the compute dtype. On CPU the simulated devices share the host's cores, so the
peak is the host's measured matmul rate, once, not per simulated device.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from internlm_jax.config import ModelConfig

# Dense bf16 peak per device (chip), FLOP/s, from the vendors' spec sheets.
PEAK_BF16: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(config: ModelConfig) -> int:
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    K, G, H, N = config.num_kv_heads, config.groups, config.head_dim, config.num_heads
    return L * (D * K * (G + 2) * H + N * H * D + 3 * D * F) + D * V


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    return 12 * config.num_layers * config.num_heads * config.head_dim * seq_len


def train_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    return 6 * matmul_params(config) + attention_flops_per_token(config, seq_len)


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, reps: int = 8, device: jax.Device | None = None
                         ) -> float:
    """Sustained FLOP/s of an [n, n] @ [n, n] matmul chain on one device (best of `reps` timed runs)."""
    device = device or jax.devices()[0]
    dt = jnp.dtype(dtype)
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt), device)
    inner = 4

    @jax.jit
    def chain(x, y):
        for _ in range(inner):  # dependent matmuls; scaled so values stay finite
            x = jnp.dot(x, y, preferred_element_type=dt) * (1.0 / n)
        return x

    chain(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 * inner / best


def peak_flops(compute_dtype: str, num_devices: int, override_tflops: float | None = None) -> tuple[float, str]:
    """Total peak FLOP/s of the devices a step runs on, and where the number came from."""
    if override_tflops:
        return override_tflops * 1e12 * num_devices, f"config peak_tflops={override_tflops} x {num_devices}"
    dev = jax.devices()[0]
    if dev.platform != "cpu" and compute_dtype in ("bfloat16", "float16"):
        for kind, flops in PEAK_BF16.items():
            if dev.device_kind.startswith(kind):
                return flops * num_devices, f"{dev.device_kind} bf16 spec {flops / 1e12:.0f} TFLOP/s x {num_devices}"
    measured = measure_matmul_flops(compute_dtype, n=1024 if dev.platform == "cpu" else 4096)
    if dev.platform == "cpu":
        return measured, f"measured {compute_dtype} matmul on the host CPU: {measured / 1e9:.1f} GFLOP/s"
    return measured * num_devices, f"measured {compute_dtype} matmul {measured / 1e12:.1f} TFLOP/s x {num_devices}"
