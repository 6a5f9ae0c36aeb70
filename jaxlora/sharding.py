"""The device mesh and the one table that maps logical axis names onto it.

Every parameter declares logical names for its dimensions (`axes` metadata, e.g. a q
projection is ("embed", "heads")); `RULES` says which mesh axis each name is split over. The
mesh has three axes: `adapter` (independent adapters, the axis `vmap` runs over), `fsdp`
(base weights, each adapter's batch rows and its LoRA matrices) and `tensor` (heads, MLP and
vocab columns). A LoRA matrix splits its model-side dimension by the table and, where that
leaves `fsdp` unused (B of a q projection, [rank, heads]; A of a down projection, [mlp,
rank]), its rank over `fsdp`: every adapter's weights, gradients and AdamW moments are then
split over `fsdp`, as an FSDP model's are, instead of half of them held whole on each device.
A dimension that a mesh axis does not divide is kept whole instead of failing, so tiny test
models run on any mesh.

The program being traced knows its target through `compiling_for(mesh)`, a trace-time context
the training step enters with its static mesh (jax's own mesh context works the same way):
`target_platform()` is the platform of that mesh's devices, so a TPU program traced on a CPU
host takes TPU paths, and `constrain` pins activations to the same rules table (batch over
`fsdp`, heads / MLP / vocab over `tensor`). With no mesh the program runs on the default
device, whose platform is the default backend, and `constrain` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.errors import JaxloraError

MESH_AXES = ("adapter", "fsdp", "tensor")

RULES: dict[str, str | None] = {
    "adapter": "adapter",
    "batch": "fsdp",
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    # Only where the matrix's other dimension has not taken fsdp (the first name wins).
    "rank": "fsdp",
    "seq": None,
}


class MeshError(JaxloraError):
    """A mesh shape that does not fit the devices."""


def mesh_sizes(adapter: int, fsdp: int, tensor: int, num_devices: int) -> dict[str, int]:
    """Axis sizes of the mesh for `num_devices`, resolving one -1 to the remaining devices."""
    sizes = [adapter, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError("at most one mesh axis may be -1 (all remaining devices)")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(
            f"mesh sizes must be positive or -1, got adapter={adapter}, fsdp={fsdp}, "
            f"tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not divide "
                f"{num_devices} devices; choose sizes whose product divides it"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh adapter={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
            f"{math.prod(sizes)} devices, but {num_devices} are available; make the "
            "product equal the device count (or use -1 for one axis)"
        )
    return dict(zip(MESH_AXES, sizes, strict=True))


def make_mesh(
    adapter: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ("adapter", "fsdp", "tensor") mesh; one size may be -1 for all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(adapter, fsdp, tensor, len(devices))
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), MESH_AXES)


def logical_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | Mapping[str, int]
) -> PartitionSpec:
    """PartitionSpec for a tensor with logical `axes`, dropping splits that do not divide.

    `mesh` may be a real mesh or just its axis sizes (for planning without devices)."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    spec: list[str | None] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape, strict=True):
        mesh_axis = RULES.get(name) if name is not None else None
        if (
            mesh_axis is None
            or mesh_axis in used
            or sizes[mesh_axis] == 1
            or dim % sizes[mesh_axis]
        ):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh | None, leading: Sequence[str] = ()):
    """The sharding of a parameter from its `axes` metadata (with extra leading logical axes)."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    value = var.get_value()
    axes = tuple(leading) + tuple(var.get_metadata().get("axes", (None,) * value.ndim))
    return NamedSharding(mesh, logical_spec(axes, value.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh | None, leading: Sequence[str] = ()):
    """A tree of shardings matching `state` (Variables replaced by their sharding)."""
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh, leading),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


_TARGET: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "jaxlora_target", default=None
)


@contextlib.contextmanager
def compiling_for(mesh: Mesh | None) -> Iterator[None]:
    """Trace the enclosed code for `mesh` (None: the default device). Only a static setting may
    enter here (a jitted function's static config), since what it decides is baked into the
    traced program and must be part of the compiled function's identity."""
    token = _TARGET.set(mesh)
    try:
        yield
    finally:
        _TARGET.reset(token)


def mesh_of(x) -> Mesh | None:
    """The mesh an array (or a `ShapeDtypeStruct`) is placed on; None off a mesh (a host
    array, one device's array)."""
    s = getattr(x, "sharding", None)
    return s.mesh if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) else None


def platform_of(mesh: Mesh) -> str:
    """ "cpu", "gpu" or "tpu": the platform of a mesh's devices (never the host's backend)."""
    return mesh.devices.flat[0].platform


def target_platform() -> str:
    """The platform the program being traced runs on: the `compiling_for` mesh's devices, or
    with none the default device's."""
    mesh = _TARGET.get()
    return jax.default_backend() if mesh is None else platform_of(mesh)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the sharding of its logical `axes` on the `compiling_for` mesh (as
    parameters are: `logical_spec`); unchanged with no mesh. Inside `vmap(spmd_axis_name=)`
    the mapped axis keeps its own mesh axis, so per-adapter activations stay on their shard."""
    mesh = _TARGET.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_spec(axes, x.shape, mesh))
    )
