"""Orbax checkpoints of a training run: the state pytree plus JSON metadata.

The state (adapter stacks, optimizer states, step, per-adapter flags) is stored as a flat
mapping of numbered leaves; the tree paths of the leaves are kept in the metadata so that a
restore against a different structure fails loudly instead of loading into the wrong slots.
Restores go straight into the target's shardings (every process reads only its shards). If the
latest step cannot be read, the previous steps are tried, with a warning; the unreadable
newer steps are then deleted so that training can save over them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlora.errors import JaxloraError

log = logging.getLogger(__name__)


class CheckpointRestoreError(JaxloraError):
    """No readable checkpoint matches the run."""


def _flatten(tree) -> tuple[dict[str, Any], list[str], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    return {f"leaf_{i:05d}": x for i, (_, x) in enumerate(leaves)}, paths, treedef


class RunCheckpoints:
    """Save every `every_steps` steps (async), keep the last `keep`, restore the newest good one."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        flat, paths, _ = _flatten(state)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat),
                meta=ocp.args.JsonSave({**meta, "step": step, "leaf_paths": paths}),
            ),
            force=True,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, target) -> tuple[Any, dict[str, Any]]:
        """The newest readable checkpoint, restored into `target`'s shapes and shardings."""
        flat_target, paths, treedef = _flatten(target)
        abstract = {
            k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            for k, x in flat_target.items()
        }
        steps = self.steps()
        if not steps:
            raise CheckpointRestoreError(f"{self.directory} holds no checkpoint to resume from")
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # a damaged step: Orbax raises many types
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                log.warning(
                    "checkpoint step %d is unreadable (%s); trying an older one",
                    step,
                    reason if len(reason) <= 160 else reason[:157] + "...",
                )
                continue
            meta = dict(restored["meta"])
            if meta.get("leaf_paths") != paths:
                raise CheckpointRestoreError(
                    f"checkpoint step {step} in {self.directory} has a different state structure "
                    "than this run; resume with the run's own config.yaml (a checkpoint written "
                    "by an earlier jaxlora version cannot be resumed: start a new run)"
                )
            for bad in steps[steps.index(step) + 1 :]:
                log.warning(
                    "removing unreadable checkpoint step %d; training resumes at %d", bad, step
                )
                self.manager.delete(bad)
            leaves = [restored["state"][k] for k in sorted(flat_target)]
            return jax.tree.unflatten(treedef, leaves), meta
        raise CheckpointRestoreError(
            f"no readable checkpoint in {self.directory} (tried steps {steps})"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
