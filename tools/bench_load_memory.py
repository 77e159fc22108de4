"""Peak host memory of `load_hf` on a random checkpoint of a few hundred MB.

    python tools/bench_load_memory.py [--dir DIR] [--vocab 32768] [--hidden 1024] [--layers 2] [--json]

Writes a random fp32 InternLM2 HF checkpoint (streamed, so writing it costs little memory), then loads it in
a fresh subprocess and reads the kernel's peak resident set (VmHWM, reset after imports via clear_refs when
the kernel allows; else ru_maxrss). On a CPU backend the loaded params are themselves host memory, so the
figure that matters is the overhead: peak - baseline - bytes of the loaded params. It is compared with the
largest single tensor; the loader's design target is about 2x that plus a constant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _kib_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def write_random_checkpoint(folder: str, config) -> dict:
    """Stream random tensors (std 0.02) into a sharded safetensors HF folder; returns sizes."""
    from internlm_jax.checkpoint.hf_layout import hf_tensors
    from internlm_jax.checkpoint.safetensors_io import PlannedTensor, plan_shards, write_safetensors

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    f32 = np.dtype(np.float32)

    def random(shape):
        return lambda: (0.02 * rng.standard_normal(shape, dtype=np.float32))

    planned = [PlannedTensor(name, t.spec.hf_shape(config), f32, random(t.spec.hf_shape(config)))
               for name, t in hf_tensors(config)]
    shards = plan_shards(planned, 200 * 2**20)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, fname), shard)
        weight_map.update({t.name: fname for t in shard})
    total = sum(t.nbytes for t in planned)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf_config(), f)
    return {"checkpoint_bytes": total, "largest_tensor_bytes": max(t.nbytes for t in planned),
            "tensors": len(planned)}


def _child(folder: str) -> None:
    import jax
    import jax.numpy as jnp

    from internlm_jax.checkpoint.hf import load_hf

    jnp.zeros(4).block_until_ready()  # backend up before the baseline
    baseline = _kib_field("VmRSS")
    try:  # "5" resets the peak-RSS counter to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    _, params = load_hf(folder, progress=False)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = _kib_field("VmHWM")
    if not reset:
        import resource

        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak, "params_bytes": params_bytes,
                      "peak_reset": reset, "load_seconds": seconds}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0

    from internlm_jax.config import ModelConfig

    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=16,
                         num_kv_heads=4, head_dim=args.hidden // 16, intermediate_size=args.hidden * 11 // 4,
                         max_position_embeddings=2048)
    folder = args.dir or os.path.join(tempfile.mkdtemp(), "ckpt")
    sizes = write_random_checkpoint(folder, config)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("XLA_FLAGS", None)  # one device: the plainest placement path
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folder], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {**sizes, **child}
    report["overhead_bytes"] = child["peak_bytes"] - child["baseline_bytes"] - child["params_bytes"]
    report["overhead_over_largest"] = report["overhead_bytes"] / sizes["largest_tensor_bytes"]
    if args.json:
        print(json.dumps(report))
    else:
        mib = 2**20
        print(f"checkpoint {sizes['checkpoint_bytes'] / mib:.0f} MiB in {sizes['tensors']} tensors, largest "
              f"{sizes['largest_tensor_bytes'] / mib:.0f} MiB; loaded in {child['load_seconds']:.1f}s")
        print(f"peak RSS {child['peak_bytes'] / mib:.0f} MiB = baseline {child['baseline_bytes'] / mib:.0f} + params "
              f"{child['params_bytes'] / mib:.0f} + overhead {report['overhead_bytes'] / mib:.0f} MiB "
              f"({report['overhead_over_largest']:.2f}x the largest tensor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
