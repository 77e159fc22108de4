"""Multi-process start-up: `jax.distributed.initialize` from the environment (TPU pods, SLURM GPU clusters) or
from explicit arguments (loopback tests), with a bounded wait and a clear error when the coordinator never answers.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from internlm_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """`auto` initialises when the environment says this is one process of many (TPU pod worker, SLURM task,
    or JAX_COORDINATOR_ADDRESS set); `coordinator_address` + `num_processes` + `process_id` force it."""

    enabled: str = "auto"  # auto | on | off
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    timeout_s: int = 300
    cpu_collectives: str = "gloo"  # CPU-only multi-process runs need gloo collectives


_INITIALISED = False


def _env_says_multiprocess() -> bool:
    flag = os.environ.get("INTERNLM_JAX_DISTRIBUTED")
    if flag is not None:  # set by tools/tpu_pod/launch.py and the SLURM script
        return flag not in ("", "0", "false")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if hosts and "," in hosts:
        return True
    ntasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
    return bool(ntasks and int(ntasks) > 1)


def initialize(config: DistributedConfig | None = None) -> tuple[int, int]:
    """Start the distributed runtime if needed; returns (process_index, process_count). Idempotent."""
    global _INITIALISED
    config = config or DistributedConfig()
    explicit = bool(config.coordinator_address)
    wanted = config.enabled == "on" or explicit or (config.enabled == "auto" and _env_says_multiprocess())
    if config.enabled == "off" or not wanted or _INITIALISED:
        return jax.process_index(), jax.process_count()
    kwargs: dict = {"initialization_timeout": int(config.timeout_s)}
    if explicit:
        if config.num_processes <= 0 or config.process_id < 0:
            raise ConfigError("with coordinator_address set, give num_processes (> 0) and process_id (>= 0) too")
        if config.process_id >= config.num_processes:
            raise ConfigError(f"process_id {config.process_id} must be < num_processes {config.num_processes}")
        kwargs.update(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                      process_id=config.process_id)
    if (explicit and os.environ.get("JAX_PLATFORMS", "") in ("cpu", "")) or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    if explicit and config.process_id != 0:
        _wait_for_coordinator(config.coordinator_address, config.timeout_s)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # jax raises deep runtime errors; say what to check
        where = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "(from the environment)")
        raise ConfigError(
            f"could not join the distributed job at coordinator {where} within {config.timeout_s}s: {e}. "
            "Check that process 0 is running and reachable on that port, that every process got the same "
            "num_processes, and that process ids are unique.") from e
    _INITIALISED = True
    return jax.process_index(), jax.process_count()


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Fail with a clear message, instead of the runtime's abort, when nothing listens at the coordinator."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator_address must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"the coordinator at {address} did not answer within {timeout_s}s ({e}). Start process 0 "
                    "first (it hosts the coordinator), and check the address, port and firewall.") from e
            time.sleep(0.5)


def is_main_process() -> bool:
    return jax.process_index() == 0
