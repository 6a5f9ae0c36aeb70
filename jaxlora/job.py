"""`Job`: what training and the evaluators share, built once from a config.

The mesh, the model loaded onto it, the config's cells (units expanded) planned and stacked in
rank groups (`training.layout: auto` chooses the layout every process agrees on, from the
smallest device memory), the cells' data, which adapters this process holds, and sharded
global batches. `jaxlora.sweep.SweepJob` trains on a job; `jaxlora.evaluate` and
`jaxlora.memory.evaluate` evaluate a finished run's adapters on one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.cells import CellPlan, Group, JobData, build_groups, expand_units, plan_cells
from jaxlora.config import Config
from jaxlora.lora import union_placement
from jaxlora.models.model import load_pretrained
from jaxlora.plan import choose_layout, device_memory_bytes, resolve_model
from jaxlora.sharding import logical_spec, make_mesh

log = logging.getLogger(__name__)


class Job:
    """What training and evaluation share: the mesh, the model, the cells and their groups, the
    data, which adapters this process holds, and sharded global batches."""

    def __init__(self, config: Config, devices: Sequence[jax.Device] | None = None):
        self.config = config
        self.mesh = make_mesh(config.mesh.adapter, config.mesh.fsdp, config.mesh.tensor, devices)
        self.model = load_pretrained(
            config.model.path,
            config.model.dtype,
            param_dtype=config.model.param_dtype,
            mesh=self.mesh,
        )
        self.config, self.units = expand_units(config, self.model.tokenizer)
        self.plans = plan_cells(self.config, self.model.config)
        m, layout = self.config.model, self.config.training.layout
        if "auto" in (m.scan_layers, m.remat, layout):
            # every process must choose the same: from the smallest memory
            mine = next(d for d in self.mesh.devices.flat if d.process_index == jax.process_index())
            gib = np.float32(device_memory_bytes(mine) / 2**30)
            memory = float(np.min(multihost_utils.process_allgather(gib))) * 2**30
            self.config, why = resolve_model(
                self.config,
                self.model.config,
                self.plans,
                self.mesh.shape,
                memory,
                self.mesh.devices.flat[0].platform,
            )
            for line in why:
                log.info(line)
        if layout == "auto":
            layout, why = choose_layout(
                self.config, self.model.config, self.plans, self.mesh.shape, memory
            )
            log.info("training.layout=auto: %s", why)
            self.config = self.config.with_value("training.layout", list(layout))
        self.groups = build_groups(self.plans, layout, self.mesh.shape["adapter"])
        self.data = JobData(
            self.plans,
            self.model.tokenizer,
            config.training.batch_size,
            vocab_size=self.model.config.vocab_size,
        )
        self.local = self._local_cells()

    def sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """[slots, rows, ...] arrays: slots over `adapter`, rows over `fsdp` (when they divide)."""
        axes = ("adapter", "batch") + (None,) * (len(shape) - 2)
        return NamedSharding(self.mesh, logical_spec(axes, shape, self.mesh))

    def global_array(self, host: np.ndarray) -> jax.Array:
        """A [slots, rows, ...] host array as a global array; only local slices are read."""
        return jax.make_array_from_callback(
            host.shape, self.sharding(host.shape), lambda idx: host[idx]
        )

    def replicated_array(self, host: np.ndarray) -> jax.Array:
        """A host array (the same on every process) whole on every device of the mesh."""
        return jax.make_array_from_callback(
            host.shape, NamedSharding(self.mesh, PartitionSpec()), lambda idx: host[idx]
        )

    def _local_cells(self) -> list[list[int]]:
        """Per group, the plan indices whose slots live (at least in part) on this process."""
        out = []
        for g in self.groups:
            n = len(g.slots)
            index_map = self.sharding((n, 1)).addressable_devices_indices_map((n, 1))
            slots = set()
            for idx in index_map.values():
                slots.update(range(*idx[0].indices(n)))
            out.append([g.slots[s] for s in sorted(slots) if g.slots[s] is not None])
        return out

    def placement(self, g: Group):
        return union_placement([self.plans[i].lora for i in g.slots if i is not None])

    def slot_plans(self, g: Group) -> list[CellPlan]:
        """Every slot's cell (padding slots repeat the group's first adapter)."""
        return [self.plans[i if i is not None else g.slots[0]] for i in g.slots]

    def by_name(self, per_group) -> dict[str, Any]:
        """{adapter name: value} from per-group [slots] arrays. A collective: every process calls it."""
        out = {}
        for g, values in zip(self.groups, per_group, strict=True):
            values = np.asarray(multihost_utils.process_allgather(values, tiled=True))
            for slot, i in g.real:
                out[self.plans[i].name] = values[slot].item()
        return out
