"""`jaxlora plan CONFIG --aot TOPOLOGY`: plan the job for a TPU slice's chips, build every
program it runs (`jaxlora.aot`: the training step and evaluation's decoding; here: the
distillation teacher; `jaxlora.aot_memory`: the memory's decoding) and compile each for the slice with libtpu's compile-only devices.

Imported only under `--aot` (cli.py): libtpu probes for TPUs when its backend starts."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.aot import (
    CHIPS,
    AotError,
    Program,
    Report,
    _variables,
    compile_program,
    eval_programs,
    teacher_context,
    topology_devices,
    train_program,
    usable_hbm,
)
from jaxlora.aot_memory import memory_programs
from jaxlora.cells import plan_cells
from jaxlora.config import Config, DistillSection
from jaxlora.models.model import abstract_module, model_config, parse_dtype
from jaxlora.objectives import teacher_outputs
from jaxlora.plan import GIB, Plan, make_plan
from jaxlora.sharding import MESH_AXES, mesh_sizes


def teacher_programs(config: Config, mesh: Mesh, plan: Plan) -> list[Program]:
    """The distillation teacher as its own program, where the job caches its outputs
    (`distill.teacher: cache`, or `auto`, which caches when they fit host memory): the frozen
    base on a unit's context and `training.batch_size` samples (`objectives.teacher_outputs`
    as `SweepJob` jits it), the context of `aot.teacher_context` tokens. With `step`, the
    teacher runs inside the training step, which `aot.train_program` compiles."""
    distilling = [p.objective for p in plan_cells(config, model_config(config.model.path))]
    distilling = [d for d in distilling if d is not None]
    if not distilling or (config.distill or DistillSection()).teacher == "step":
        return []
    c = model_config(config.model.path)
    dtype = parse_dtype(config.model.dtype)
    param_dtype = parse_dtype(config.model.param_dtype or config.model.dtype)
    graph, *_, base = abstract_module(c, None, dtype, param_dtype)
    B, T, C = config.training.batch_size, config.data.max_length, teacher_context(config, c)
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [
        jax.ShapeDtypeStruct(shape, dt, sharding=replicated)
        for shape, dt in (((C,), jnp.int32), ((C,), bool), ((B, T), jnp.int32), ((B, T), bool))
    ]
    # Plan's figure: the weights, one layer's activations and the float32 logits of every
    # position of the B rows of context + sample (the teacher keeps no backward state).
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    tokens = B * (C + T)
    per_token = (4 * D + N * H + 2 * K * H + 3 * F) * jnp.dtype(dtype).itemsize
    estimate = plan.rows[0][1] + tokens * per_token + tokens * c.vocab_size * 4
    offset = 1 if c.bos_token_id is not None else 0
    return [
        Program(
            f"teacher[{d.kl_weight:g} KL + {d.l1_weight:g} L1: {C} context + {B} x {T} tokens]",
            jax.jit(teacher_outputs, static_argnums=(0, 2, 7)),
            (graph, _variables(base, mesh), d, *args, offset),
            estimate,
            0.0,
            mesh,
        )
        for d in dict.fromkeys(distilling)  # each distinct setting once
    ]


def compile_job(
    config: Config, topology: str, mfu: float = 0.4, context: int = 0, devices: int | None = None
) -> Report:
    """Plan `config` for the chips of `topology` and compile its programs for them (`devices`,
    when given, must be the topology's chip count)."""
    # A persistent-cache hit would be no compile at all: this command measures the compiler.
    # Before the first compile (usable_hbm's probe): jax decides once whether it uses the cache.
    jax.config.update("jax_enable_compilation_cache", False)
    chips = topology_devices(topology)
    if devices is not None and devices != len(chips):
        raise AotError(f"--devices {devices} but {topology} has {len(chips)} chips; drop one")
    devices = len(chips)
    _, nominal, peak = CHIPS[topology.split(":")[0]]
    kind = chips[0].device_kind  # what libtpu describes, e.g. "TPU v5 lite"
    # libtpu may describe a chip as several devices (v4's two cores): they share its HBM.
    per_chip = devices / math.prod(int(n) for n in topology.split(":")[1].split("x"))
    nominal, peak = nominal / per_chip, peak / per_chip
    # Fits are judged against what the compiler lets a program use (v5e: 15.75 of 16 GiB).
    hbm, source = usable_hbm(chips[0])
    plan = make_plan(config, devices, hbm / GIB, peak / 1e12, mfu, context, platform="tpu")
    c = plan.config.mesh
    sizes = mesh_sizes(c.adapter, c.fsdp, c.tensor, devices)
    mesh = Mesh(np.asarray(chips).reshape(tuple(sizes.values())), MESH_AXES)
    programs = [
        train_program(plan.config, mesh, plan),
        *teacher_programs(plan.config, mesh, plan),
        *eval_programs(plan.config, mesh, plan),
        *memory_programs(plan.config, mesh, plan),
    ]
    programs = [compile_program(p) for p in programs]
    return Report(topology, devices, kind, hbm, plan, programs, nominal, source)


def run_cli(
    config: Config,
    topology: str,
    devices: int | None,
    device: str | None,
    mfu: float,
    context: int,
    as_json: bool,
) -> int:
    """`jaxlora plan CONFIG --aot TOPOLOGY`: print plan and the compiler's figures (with
    `as_json`, one JSON object last); a program that does not fit is an error (exit 2)."""
    kind = topology.split(":")[0]
    if device is not None and device != f"tpu-{kind}":
        raise AotError(f"--device {device} is not the chip of --aot {topology}; drop --device")
    report = compile_job(config, topology, mfu, context, devices=devices)
    print(report.plan.render())
    print(report.render())
    if as_json:
        print(json.dumps(report.to_json()))
    if not report.fits:
        worst = max(report.programs, key=lambda p: p.total)
        raise AotError(
            f"{worst.name} does not fit a {report.device_kind} chip of {topology}: "
            f"{worst.total / GIB:.2f} GiB of {report.hbm_bytes / GIB:.2f} GiB"
        )
    return 0
