"""Orbax checkpoints of a training run: params, optimizer state, step, data-iterator state and run config.

Layout: `<output_dir>/checkpoints/<step>/{params,opt_state,meta,data,config,model}`, where `<step>` counts
completed optimizer steps. Saves are asynchronous (the train loop continues while tensors are written).

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only after every
item is fully written (the finalize step). `latest_step()` lists finalized steps only, so a process killed in
the middle of a save leaves a tmp folder that is never restored (and is deleted on the next start).

Restore takes target shardings, so a run saved on one mesh resumes on another (orbax reads each shard's slice).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from internlm_jax.config import ConfigError, ModelConfig

# Fields that define the parameter shapes; numerics fields (dtype, remat, ...) may differ across a resume.
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size")
ITEMS = ("params", "opt_state", "meta", "data", "config", "model")


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs that carry the target sharding (restore places each array there)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def arch_of(model: dict[str, Any] | ModelConfig) -> dict[str, Any]:
    d = model if isinstance(model, dict) else {f: getattr(model, f) for f in ARCH_FIELDS}
    return {f: d.get(f) for f in ARCH_FIELDS}


def check_same_model(saved: dict[str, Any], current: ModelConfig, where: str) -> None:
    """Clear error when a checkpoint was written for a different architecture."""
    a, b = arch_of(saved), arch_of(current)
    diff = [f"{k}: checkpoint {a[k]} vs this run {b[k]}" for k in ARCH_FIELDS if a[k] != b[k]]
    if diff:
        raise ConfigError(f"the checkpoint at {where} belongs to a different model ({'; '.join(diff)}). "
                          "Use another output_dir for this model, or set model.name/overrides to match it.")


class Checkpointer:
    """Async, keep-last-K checkpoints of one run directory."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False) -> None:
        """read_only: open another run's checkpoints (init_from) without creating, cleaning or deleting."""
        self.directory = os.path.abspath(directory)
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ---- queries ------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def read_json(self, step: int, item: str) -> Any:
        out = self._mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return out[item]

    def check_model(self, model: ModelConfig, step: int | None = None) -> None:
        step = self.latest_step() if step is None else step
        if step is None:
            return
        try:
            saved = self.read_json(step, "model")
        except Exception as e:  # noqa: BLE001 - any unreadable layout means "not ours"
            raise ConfigError(f"{self.directory}/{step} is not a checkpoint written by `internlm-jax train` "
                              f"(no readable model item: {type(e).__name__}); point output_dir elsewhere") from None
        check_same_model(saved, model, f"{self.directory}/{step}")

    # ---- save / restore -----------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], *, data_state: Any, run_config: dict[str, Any],
             model: ModelConfig) -> None:
        """Start an async save of `state` (dict with params, opt_state, step) as checkpoint `step`."""
        from internlm_jax.runconfig import to_dict

        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave({"step": int(step)}),
            data=ocp.args.JsonSave({"state": data_state}),
            config=ocp.args.JsonSave(run_config),
            model=ocp.args.JsonSave(to_dict(model)),
        )
        self._mngr.save(step, args=args, force=True)

    def restore(self, step: int, target: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Restore checkpoint `step` into the shardings of `target` (a state of arrays or ShapeDtypeStructs
        with .sharding). Returns (state, data_state)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(target["opt_state"])),
            meta=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        )
        try:
            out = self._mngr.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot restore {self.directory}/{step} into this run's state: {e}. Was it "
                              "written with a different optimizer, trainable set or model?") from None
        state = {"step": jax.device_put(jax.numpy.asarray(out["meta"]["step"], jax.numpy.int32),
                                        target["step"].sharding),
                 "params": out["params"], "opt_state": out["opt_state"]}
        return state, out["data"]["state"]

    def restore_params(self, step: int, target_params: Any) -> Any:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_params))))
        return out["params"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(checkpoints dir, step) for a run dir, its `checkpoints/` dir, or one `checkpoints/<step>` dir."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return os.path.dirname(path), int(base)
    latest = None
    if os.path.isdir(path):
        # orbax decides what is complete (a rename on local disks, a commit marker on object stores)
        ck = Checkpointer(path, read_only=True)
        try:
            latest = ck.latest_step()
        finally:
            ck.close()
    if latest is None:
        raise ConfigError(f"{path} holds no complete checkpoint (expected a run dir of `internlm-jax train`, its "
                          "checkpoints/ folder, or one checkpoints/<step> folder)")
    return path, latest


def read_model_json(path: str) -> dict[str, Any] | None:
    """The model config saved with a checkpoint, or None when `path` is not one of ours."""
    try:
        directory, step = resolve_checkpoint(path)
    except ConfigError:
        return None
    model_dir = os.path.join(directory, str(step), "model")
    for name in ("metadata",):
        cand = os.path.join(model_dir, name)
        if os.path.exists(cand):
            with open(cand) as f:
                return json.load(f)
    return None
