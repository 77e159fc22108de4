"""Test session setup. Eight simulated CPU devices must exist before jax is first imported: the sharding
tests build an (fsdp=4, tensor=2) mesh, and other test files rely on the same 8 devices."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# Tests run on the CPU even where libtpu (the `tpu` extra, for AOT planning) is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
