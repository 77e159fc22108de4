"""`internlm-jax plan`: compile the real train step ahead of time for a TPU topology on a CPU-only host.

    internlm-jax plan --config configs/pretrain/internlm2_7b.yaml --topology v5p:4x4x4 [--num-slices 2] \
        [--search] [--write-config best.yaml] [key=value ...]

Needs libtpu (`pip install -e .[tpu]`), never a TPU: `jax.experimental.topologies.get_topology_desc` describes the
chips, the step is lowered with abstract (ShapeDtypeStruct) state sharded over a mesh of those devices, and the
compiled executable's memory analysis says whether it fits in HBM. Prints one JSON line per compiled variant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

# HBM per chip (bytes) by device_kind; from the TPU system architecture pages.
HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5e": 16 << 30, "TPU v5": 95 << 30,
             "TPU v5p": 95 << 30, "TPU v6 lite": 32 << 30, "TPU v6e": 32 << 30}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
REMAT_ORDER = ("none", "minimal", "dots", "full")  # from most memory / least recompute to least memory


class PlanError(RuntimeError):
    pass


def get_topology(topology: str, num_slices: int = 1) -> Any:
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise PlanError("libtpu is not installed: `pip install -e .[tpu]` (AOT compilation for TPU needs it; no TPU "
                        "is needed) and run with JAX_PLATFORMS=cpu") from e
    from jax.experimental import topologies

    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT only: several planners may run at once
    if not re.fullmatch(r"v\w+:\d+(x\d+)+", topology):
        raise PlanError(f"topology {topology!r} is not of the form <chip>:<AxBxC>, e.g. v5e:2x2, v5p:8x16x16, v4:4x4x8")
    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
    except Exception as e:
        raise PlanError(f"libtpu does not know topology {topology!r} ({str(e).splitlines()[0][:200]}); use names like "
                        "v5e:2x2, v5e:16x16, v5p:4x4x4, v5p:8x16x16, v4:4x4x4") from e


def hlo_collectives(hlo_text: str) -> dict[str, int]:
    counts = {}
    for name in COLLECTIVES:
        n = len(re.findall(rf"\b{name}(-start)?\(", hlo_text))
        if n:
            counts[name] = n
    return counts


def compile_step(cfg: Any, devices: list[Any]) -> dict[str, Any]:
    """Lower and compile the train step of `cfg` (a TrainConfig) over `devices`; return the plan record."""
    import jax
    import jax.numpy as jnp

    from internlm_jax import model as model_lib
    from internlm_jax.kernels import aot_target
    from internlm_jax.sharding import make_mesh
    from internlm_jax.train.optimizer import build_optimizer
    from internlm_jax.train.step import abstract_state, default_loss_fn, make_step_fns

    model = cfg.model.build()
    mesh = make_mesh(cfg.mesh, devices)
    tx, schedule = build_optimizer(cfg.optimizer, cfg.steps)
    mask_fn = lambda shapes: jax.tree.map(lambda _: True, shapes)  # noqa: E731 (pre-training: all trainable)
    state, mask = abstract_state(model, tx, mask_fn, lambda k: model_lib.init_params(model, k))
    fns = make_step_fns(model, tx, schedule, mesh, state, model_lib.param_axes(model), mask,
                        grad_accum=cfg.grad_accum, loss_fn=default_loss_fn(cfg.z_loss, cfg.loss_chunk))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, fns.shardings)
    seq = cfg.data.seq_len if cfg.data is not None else 4096
    b = cfg.global_batch_size
    batch = {k: jax.ShapeDtypeStruct((b, seq), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=fns.batch_sharding)
             for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    t0 = time.perf_counter()
    with aot_target("tpu"):  # attention_impl=auto lowers the Mosaic flash kernel, as on a real TPU
        compiled = fns.train.lower(abstract, batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    n_params = model.num_params()
    return {
        "devices": len(devices),
        "device_kind": kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "params": n_params,
        "global_batch_size": b,
        "seq_len": seq,
        "grad_accum": cfg.grad_accum,
        "remat": model.remat,
        "dtype": model.dtype,
        "bytes_per_device": int(per_device),
        "memory": {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                   "aliased": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes},
        "hbm_bytes_per_device": hbm,
        "fits": None if hbm is None else bool(per_device <= 0.95 * hbm),
        "flops_per_step": flops * len(devices),  # cost_analysis is per device (one SPMD partition)
        "model_flops_per_step": 6 * n_params * b * seq,
        # XLA's cost analysis counts a scanned layer body once and does not see inside Pallas kernels, so
        # flops_per_step undercounts a scanned model; model_flops_per_step (6 N tokens) is the MFU numerator.
        "flops_note": "flops_per_step is XLA cost analysis (scan body counted once, Pallas kernels excluded)",
        "collectives": hlo_collectives(compiled.as_text()),
        "compile_seconds": round(seconds, 1),
    }


@contextlib.contextmanager
def _heartbeat(what: str, every_s: float = 15.0) -> Iterator[None]:
    """Progress on stderr (stdout carries the JSON lines): `what` now, then the elapsed time every `every_s`
    seconds until the block ends, then its duration."""
    t0 = time.perf_counter()
    done = threading.Event()
    print(f"plan: {what} ...", file=sys.stderr, flush=True)

    def tick() -> None:
        while not done.wait(every_s):
            print(f"plan:   still compiling ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(f"plan:   done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="internlm-jax plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a pre-training YAML (configs/pretrain/...)")
    p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:4x4x4, v5p:8x16x16")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: slices joined over DCN (data parallel)")
    p.add_argument("--search", action="store_true", help="try remat policies x grad_accum; report the best that fits")
    p.add_argument("--write-config", default="", help="with --search: write the best fitting config YAML here")
    p.add_argument("--out", default="", help="append the JSON lines to this file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)

    from internlm_jax.config import ConfigError
    from internlm_jax.runconfig import load_config, to_dict
    from internlm_jax.train.config import TrainConfig

    try:
        print(f"plan: building the {args.topology} topology (libtpu) ...", file=sys.stderr, flush=True)
        topo = get_topology(args.topology, args.num_slices)
        overrides = list(args.overrides)
        if args.num_slices > 1:
            overrides.append(f"mesh.dcn_data={args.num_slices}")
        cfg = load_config(TrainConfig, args.config, overrides)
        devices = list(topo.devices)
        try:
            cfg.mesh.sizes(len(devices))
        except ConfigError as e:
            raise PlanError(f"mesh {dataclasses.asdict(cfg.mesh)} does not match topology {args.topology} "
                            f"({len(devices)} chips): {e}") from e
        variants = [cfg]
        if args.search:
            variants = []
            for accum in sorted({1, 2, 4, 8, cfg.grad_accum}):
                if cfg.global_batch_size % accum:
                    continue
                for remat in REMAT_ORDER:
                    variants.append(dataclasses.replace(
                        cfg, grad_accum=accum,
                        model=dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, "remat": remat})))
        records = []
        for i, v in enumerate(variants, 1):
            what = (f"compiling the train step {i}/{len(variants)} for {len(devices)} {devices[0].device_kind} "
                    f"chips (remat={v.model.overrides.get('remat', 'default')}, grad_accum={v.grad_accum})")
            try:
                with _heartbeat(what):
                    rec = compile_step(v, devices)
            except Exception as e:  # one variant failing (e.g. compiler OOM) must not end the search
                rec = {"remat": v.model.overrides.get("remat"), "grad_accum": v.grad_accum, "fits": False,
                       "error": str(e).splitlines()[0][:300]}
            rec = {"topology": args.topology, "num_slices": args.num_slices, "config": args.config, **rec}
            records.append(rec)
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
        if args.search:
            fitting = [(r, v) for r, v in zip(records, variants) if r.get("fits")]
            if not fitting:
                print(json.dumps({"best": None, "reason": "no remat x grad_accum variant fits in HBM"}))
                return 1
            # Least recompute first, then fewest micro-batches (more work per step = better utilisation).
            best_r, best_v = min(fitting, key=lambda rv: (REMAT_ORDER.index(rv[0]["remat"]), rv[0]["grad_accum"]))
            print(json.dumps({"best": {"remat": best_r["remat"], "grad_accum": best_r["grad_accum"],
                                       "bytes_per_device": best_r["bytes_per_device"]}}))
            if args.write_config:
                import yaml

                with open(args.write_config, "w") as f:
                    yaml.safe_dump(to_dict(best_v), f, sort_keys=False)
        return 0
    except (PlanError, ConfigError) as e:
        print(f"internlm-jax plan: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
