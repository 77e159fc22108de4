#!/usr/bin/env python3
"""Launch internlm-jax training on a Cloud TPU slice with gcloud.

    python tools/tpu_pod/launch.py up    --name ij-7b --zone us-east5-a --accelerator v5p-128 \
        --config configs/pretrain/internlm2_7b.yaml [--spot] [--dry-run] [-- key=value ...]
    python tools/tpu_pod/launch.py logs  --name ij-7b --zone us-east5-a
    python tools/tpu_pod/launch.py stop  --name ij-7b --zone us-east5-a
    python tools/tpu_pod/launch.py down  --name ij-7b --zone us-east5-a

`up` = create (a queued resource, or reuse an existing slice) -> wait until ACTIVE -> copy the package (a wheel
built from this checkout) to every worker -> install it with the `tpu` extra -> start training on all workers
at once (each worker runs the same command; `jax.distributed.initialize()` finds its peers from the TPU
environment) -> stream worker 0's log. `--dry-run` prints every command, copy-pasteable, and runs nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5litepod": "v2-alpha-tpuv5-lite",
           "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "internlm-jax"
LOG = "~/internlm-jax-train.log"


def check_accelerator(accelerator: str) -> str | None:
    """None if `accelerator` is a known family and a core/chip count (v5p-128), else a message (with a
    did-you-mean for a near miss)."""
    import difflib
    import re

    family, _, n = accelerator.partition("-")
    if family in RUNTIME and re.fullmatch(r"[1-9][0-9]*", n):
        return None
    m = re.match(r"(v[0-9a-z]+)-([0-9]+)", accelerator)
    near = (difflib.get_close_matches(family, RUNTIME, n=1) or [""])[0]
    guess = f"{m.group(1) if m and m.group(1) in RUNTIME else near}-{m.group(2) if m else 8}" if (m or near) else ""
    return (f"unknown accelerator type {accelerator!r}; expected FAMILY-COUNT with FAMILY in {', '.join(RUNTIME)} "
            "(e.g. v5p-128, v5litepod-256, v4-64)" + (f"; did you mean {guess!r}?" if guess else ""))


def runtime_for(accelerator: str) -> str:
    family = accelerator.split("-")[0]
    if family not in RUNTIME:
        raise SystemExit(f"unknown accelerator type {accelerator!r}; expected e.g. v5p-128, v5litepod-256, v4-64")
    return RUNTIME[family]


def workers(accelerator: str) -> int:
    """Hosts in a slice: 4 chips per host on v4/v5p (cores = 2x chips in the name for v4/v5p), 4 or 8 on v5e."""
    family, _, n = accelerator.partition("-")
    n = int(n)
    if family in ("v4", "v5p"):
        return max(1, n // 8)  # the suffix counts TensorCores: 2 per chip, 4 chips per host
    return max(1, n // 8) if n > 8 else 1  # v5e/v6e: 8 chips per host (single host up to 8 chips)


class Runner:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, cmd: list[str], check: bool = True, capture: bool = False) -> str:
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        if self.dry_run:
            return ""
        res = subprocess.run(cmd, check=check, text=True, capture_output=capture)
        return res.stdout if capture else ""


def ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, f"--zone={args.zone}",
            f"--project={args.project}" if args.project else "--quiet", f"--worker={worker}", "--command", command]


def cmd_up(args: argparse.Namespace, run: Runner) -> None:
    accel = args.accelerator
    proj = [f"--project={args.project}"] if args.project else []
    if not args.reuse:
        create = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}",
                  f"--zone={args.zone}", f"--accelerator-type={accel}", f"--runtime-version={runtime_for(accel)}",
                  *proj]
        if args.spot:
            create.append("--spot")
        run(create)
        describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, f"--zone={args.zone}",
                    "--format=value(state.state)", *proj]
        if args.dry_run:
            run(describe)
            print(f"# repeat the describe until it prints ACTIVE (the launcher polls every {args.poll_s}s)")
        else:
            deadline = time.time() + args.wait_s
            while True:
                state = run(describe, capture=True).strip()
                if state == "ACTIVE":
                    break
                if state in ("FAILED", "SUSPENDED") or time.time() > deadline:
                    raise SystemExit(f"queued resource {args.name} is {state or 'unknown'}; see `gcloud compute tpus "
                                     f"queued-resources describe {args.name} --zone={args.zone}`")
                time.sleep(args.poll_s)
    # Ship this checkout as a wheel so every worker runs exactly the same code.
    run(["python3", "-m", "pip", "wheel", "--no-deps", "-w", "dist", "."])
    run(ssh(args, f"mkdir -p ~/{REMOTE_DIR}"))
    run(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "dist", "configs",
         f"{args.name}:~/{REMOTE_DIR}/", f"--zone={args.zone}", "--worker=all", *proj])
    install = (f"cd ~/{REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
               f".venv/bin/pip install -q \"$(ls dist/internlm_jax-*.whl | tail -1)[tpu]\"")
    run(ssh(args, install))
    overrides = " ".join(shlex.quote(o) for o in args.overrides)
    train = (f"cd ~/{REMOTE_DIR} && pkill -f 'internlm-jax train' ; "
             f"INTERNLM_JAX_DISTRIBUTED={'1' if workers(args.accelerator) > 1 else '0'} "
             f"nohup .venv/bin/internlm-jax train --config {shlex.quote(args.config)} {overrides} "
             f"> {LOG} 2>&1 < /dev/null &")
    run(ssh(args, train))
    cmd_logs(args, run)


def cmd_logs(args: argparse.Namespace, run: Runner) -> None:
    run(ssh(args, f"tail -n 200 -F {LOG}", worker="0"), check=False)


def cmd_stop(args: argparse.Namespace, run: Runner) -> None:
    run(ssh(args, "pkill -f 'internlm-jax train' || true"))


def cmd_down(args: argparse.Namespace, run: Runner) -> None:
    proj = [f"--project={args.project}"] if args.project else []
    run(["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, f"--zone={args.zone}", "--force",
         "--quiet", *proj])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "logs", "stop", "down"])
    p.add_argument("--name", required=True, help="TPU node / queued-resource name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="")
    p.add_argument("--accelerator", default="v5p-128", help="e.g. v5p-128, v5litepod-256, v4-64")
    p.add_argument("--config", default="configs/pretrain/internlm2_7b.yaml")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--reuse", action="store_true", help="use an existing slice instead of creating one")
    p.add_argument("--wait-s", type=int, default=3600)
    p.add_argument("--poll-s", type=int, default=30)
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = p.parse_args(argv)
    args.overrides = overrides
    problem = check_accelerator(args.accelerator)
    if problem:
        p.error(f"--accelerator: {problem}")  # usage error: exit code 2, no traceback
    run = Runner(args.dry_run)
    if args.dry_run:
        print(f"# {args.action} {args.name}: {args.accelerator} ({workers(args.accelerator)} workers) in {args.zone}")
    {"up": cmd_up, "logs": cmd_logs, "stop": cmd_stop, "down": cmd_down}[args.action](args, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
