"""Per-chip memory of the training step, from the TPU compiler, on a machine with no TPU.

With `jax[tpu]` installed (libtpu), `jax.experimental.topologies` gives compile-only TPU
devices; the step is built as `benchmarks/bench_compile.py` builds it (the study's recipe:
bf16, all-linear adapters, dropout 0.1, `remat: block`) but over a mesh of those devices,
every input a `jax.ShapeDtypeStruct` carrying the job's `NamedSharding` (base by the rules
table, adapter stacks on `adapter`, batches on `adapter` x `fsdp`), and the step's `mesh` is
that mesh, so its platform paths and activation constraints are the TPU's. What is printed is
`compiled.memory_analysis()` per chip, or the compiler's refusal.

    python -m benchmarks.tpu_fit --shape llama-3.1-8b-shape --mesh 2/4/1 --scan
    python -m benchmarks.tpu_fit --shape llama-3.2-1b-shape --mesh 8/1/1

Never the unrolled 8B on a small machine: 14 GiB of host RAM and ~7 minutes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from benchmarks.common import zero_group
from jaxlora.lora import LoRAConfig, union_placement
from jaxlora.models.model import abstract_module, parse_dtype
from jaxlora.models.presets import PRESETS
from jaxlora.sharding import logical_spec, make_mesh
from jaxlora.train import StepConfig, TrainState, compile_step


def tpu_devices(topology: str = "v5e:2x4") -> list:
    """Compile-only devices of a TPU topology (needs libtpu: `jax[tpu]`)."""
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def _on(mesh: Mesh, x, axes) -> jax.ShapeDtypeStruct:
    spec = logical_spec(tuple(axes), x.shape, mesh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def abstract_step(
    shape: str,
    mesh: Mesh,
    *,
    adapters: int = 16,
    rank: int = 8,
    batch: int = 8,
    seq: int = 128,
    dtype: str = "bfloat16",
    remat: str = "block",
    scan: bool = True,
    dropout: float = 0.1,
    step_mesh: bool = True,
):
    """(jitted step, (base, state, batches) as sharded ShapeDtypeStructs) of one rank group of
    `adapters` all-linear adapters on `mesh`, all adapters in one pass (an accelerator's
    `adapters_per_pass: auto`). `step_mesh=False` leaves the mesh out of the step's config:
    the host's platform and no activation constraints, the step as it was before both."""
    config = PRESETS[shape].config
    dt = parse_dtype(dtype)
    loras = [LoRAConfig(rank, dropout=dropout).validate(config)] * adapters
    placement = union_placement(loras)
    graphdef, w_abs, c_abs, base = abstract_module(config, placement, dt, dt, remat, scan)

    def param(var):
        x = var.get_value()
        return var.replace(_on(mesh, x, var.get_metadata().get("axes", (None,) * x.ndim)))

    base = jax.tree.map(param, base, is_leaf=lambda x: isinstance(x, nnx.Variable))

    group = jax.tree.map(
        lambda x: _on(mesh, x, ("adapter",) + (None,) * (x.ndim - 1)),
        jax.eval_shape(lambda: zero_group(w_abs, c_abs, adapters)),
    )
    rows = jax.ShapeDtypeStruct((adapters, batch, seq), jnp.int32)
    flags = jax.ShapeDtypeStruct((adapters, batch, seq), bool)
    batches = (tuple(_on(mesh, x, ("adapter", "batch", "seq")) for x in (rows, flags, flags)),)
    cfg = StepConfig(
        graphdefs=(graphdef,),
        schedule="cosine",
        total_steps=1500,
        use_dropout=dropout > 0,
        spmd_axis_name="adapter",
        scan_layers=scan,
        # (a tree from before StepConfig.mesh: its step read the host's platform)
        **({"mesh": mesh} if step_mesh and "mesh" in StepConfig.__dataclass_fields__ else {}),
    )
    state = TrainState(step=_on(mesh, jax.ShapeDtypeStruct((), jnp.int32), ()), groups=(group,))
    return compile_step(cfg), (base, state, batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b-shape")
    p.add_argument("--topology", default="v5e:2x4")
    p.add_argument("--mesh", default="2/4/1", help="adapter/fsdp/tensor")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--remat", default="block", choices=("none", "block"))
    p.add_argument("--scan", action="store_true", help="model.scan_layers")
    args = p.parse_args()
    if args.shape.startswith("llama-3.1-8b") and not args.scan:
        raise SystemExit("the unrolled 8B takes ~14 GiB of host RAM and ~7 min: use --scan")
    a, f, t = (int(s) for s in args.mesh.split("/"))
    mesh = make_mesh(a, f, t, devices=tpu_devices(args.topology))
    step, inputs = abstract_step(
        args.shape,
        mesh,
        adapters=args.adapters,
        rank=args.rank,
        batch=args.batch,
        seq=args.seq,
        remat=args.remat,
        scan=args.scan,
        dropout=args.dropout,
    )
    t0 = time.perf_counter()
    lowered = step.lower(*inputs)
    try:
        compiled = lowered.compile()
    except Exception as e:  # the compiler's refusal (RESOURCE_EXHAUSTED) is a result here
        print(f"{args.shape} {args.mesh}: refused after {time.perf_counter() - t0:.0f}s")
        print(str(e).splitlines()[0][:400])
        return
    m = compiled.memory_analysis()
    gib = 2**30
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    print(
        f"{args.shape} mesh {args.mesh} {'scan' if args.scan else 'unrolled'}: per chip "
        f"{total / gib:.2f} GiB (arguments {m.argument_size_in_bytes / gib:.2f}, outputs "
        f"{m.output_size_in_bytes / gib:.2f}, aliased {m.alias_size_in_bytes / gib:.2f}, "
        f"temporaries {m.temp_size_in_bytes / gib:.2f}); {time.perf_counter() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
