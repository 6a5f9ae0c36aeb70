"""`jaxlora plan CONFIG --aot TOPOLOGY`: the job's programs compiled for a TPU slice, here.

libtpu (the `tpu-aot` extra) gives compile-only TPU devices on any machine:
`jax.experimental.topologies.get_topology_desc("v5e:2x4", "tpu")` describes a slice's chips
without owning one. The training step is built as `SweepJob` builds it (one graph definition
per rank group, the mesh's platform deciding `adapters_per_pass`, AdamW state per adapter),
every input a `jax.ShapeDtypeStruct` carrying the job's `NamedSharding` on a mesh of those
devices, and `jit(step).lower(...).compile()` runs the real TPU compiler. Its
`memory_analysis()` is per chip, the figure a job on that slice would meet; a program that
does not fit is refused with RESOURCE_EXHAUSTED, whose message names the largest buffers.

This module is imported only under `--aot`: libtpu probes for TPUs when its backend starts,
and the rest of the CLI never asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding

from jaxlora.cells import (
    Group,
    build_groups,
    count_passes,
    expand_units,
    plan_cells,
    resolve_per_pass,
)
from jaxlora.config import Config, DistillSection
from jaxlora.errors import JaxloraError
from jaxlora.generate import DecodeSpec, decode_stack_for
from jaxlora.lora import union_placement
from jaxlora.models.model import abstract_module, local_tokenizer, model_config, parse_dtype
from jaxlora.plan import GIB, Plan
from jaxlora.sharding import compiling_for, logical_spec
from jaxlora.train import (
    GroupState,
    Hyper,
    StepConfig,
    TrainState,
    compile_step,
    map_opt_state,
)

# Chip generations libtpu 0.0.42 describes, with their HBM per chip (vendor specifications)
# and the peak dense bf16 FLOP/s that plan's step time assumes.
CHIPS: dict[str, tuple[str, float, float]] = {
    # name: (device_kind, HBM bytes, peak FLOP/s)
    "v4": ("TPU v4", 32 * GIB, 275e12),
    "v5e": ("TPU v5 lite", 16 * GIB, 197e12),
    "v5p": ("TPU v5", 95 * GIB, 459e12),
    "v6e": ("TPU v6 lite", 32 * GIB, 918e12),
}
# HBM per device that the TPU compiler lets one program use (libtpu 0.0.42), as its refusal
# states it ("... exceeds available HBM (15.75G)"): `usable_hbm` reads it from the compiler on
# every run; these are its readings (2026-12-06), used only if the compiler's message changes.
# v4: per device (libtpu describes a 32 GiB v4 chip as two devices). v5p: more than the 95
# GiB of CHIPS, the figure as sold.
USABLE_GIB: dict[str, float] = {"v4": 15.25, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}
# Temporaries of the probe program: more than any chip's HBM, so the compiler refuses it.
PROBE_BYTES = 256 * 2**30
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")
INSTALL = 'pip install -e ".[tpu-aot]"'
# libtpu's start-up lines on a machine that is not a TPU VM: it looks for the VM's metadata.
NOISE = re.compile(
    r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|"
    r"Source Location Trace|libtpu_init_utils|host bounds|^\s*$|^={3}"
)


class AotError(JaxloraError):
    """The AOT compile cannot run (no libtpu, an unknown topology)."""


def accepted() -> str:
    return ", ".join(f"{name}:AxB[xC]" for name in CHIPS) + " (e.g. v5e:2x4, v5p:2x2x1)"


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """libtpu writes its environment warnings to file descriptor 2 from C++; hold them and
    pass on every other line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines():
                if not NOISE.search(line):
                    print(line, file=sys.stderr)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list[jax.Device]:
    """The compile-only devices of a TPU topology, e.g. "v5e:2x4" (8 chips)."""
    if not TOPOLOGY.match(name):
        raise AotError(f"unknown TPU topology {name!r}; accepted: {accepted()}")
    if not libtpu_installed():
        raise AotError(f"--aot needs libtpu (compile-only TPU devices): {INSTALL}")
    # libtpu takes a lockfile so that two processes never drive one TPU; compile-only devices
    # drive none, and a second `plan --aot` (or a test beside a compile) must not be refused.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _quiet_stderr():
        try:
            topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
        except Exception as e:  # libtpu's own refusal of a shape, as one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AotError(
                f"libtpu rejects topology {name!r} ({first}); accepted: {accepted()}"
            ) from None
    return list(topo.devices)


def usable_hbm(device: jax.Device) -> tuple[float, str]:
    """(bytes, where from): the HBM per device the TPU compiler lets a program use, read from
    its refusal of a probe whose temporaries (a sort of PROBE_BYTES) exceed any chip; the
    USABLE_GIB reading of the chip if the refusal does not state it."""
    rows = PROBE_BYTES // 4 // 2**20

    def probe(x):  # the sort needs its whole [rows, 2^20] float32 input in temporaries
        y = jnp.broadcast_to(x, (rows, 2**20)) * jnp.arange(2**20, dtype=jnp.float32)
        return jnp.sort(y, axis=1)[:, :1]

    arg = jax.ShapeDtypeStruct(
        (1,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device)
    )
    try:
        with _quiet_stderr():
            jax.jit(probe).lower(arg).compile()
    except Exception as e:  # the refusal we ask for
        _, usable = parse_refusal(str(e))
        if usable is not None:
            return usable, "the compiler"
    generation = next(k for k, (kind, *_) in CHIPS.items() if kind == device.device_kind)
    return USABLE_GIB[generation] * GIB, "libtpu 0.0.42's reading"


# ---------------------------------------------------------------------------------------------
# the training step, abstract


def _sharded(x: Any, mesh: Mesh, axes: Sequence[str | None]) -> jax.ShapeDtypeStruct:
    spec = logical_spec(tuple(axes), x.shape, mesh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def _variables(tree, mesh: Mesh, leading: Sequence[str] = (), leading_in_shape: bool = False):
    """ShapeDtypeStructs of a parameter tree, split by its `axes` (after `leading` axes, which
    the values' shapes already have with `leading_in_shape`) as the job splits it."""

    def one(var):
        x = var.get_value()
        own = x.ndim - (len(leading) if leading_in_shape else 0)
        axes = tuple(leading) + tuple(var.get_metadata().get("axes", (None,) * own))
        return var.replace(_sharded(x, mesh, axes))

    return jax.tree.map(one, tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


@dataclasses.dataclass
class Program:
    """One jitted program and its abstract arguments."""

    name: str
    fn: Callable
    args: tuple
    estimated_bytes: float  # plan's own figure for this program
    estimated_flops: float  # plan's FLOPs per chip
    # Traced for these devices (`sharding.compiling_for`): on a TPU host a program reads its
    # platform from the default backend, which here is this CPU.
    mesh: Mesh | None = None


def train_program(config: Config, mesh: Mesh, plan: Plan) -> Program:
    """The job's training step as `SweepJob.step_function` builds it, over abstract inputs:
    the base as the model's sharding rules split it, every per-adapter leaf split on `adapter`
    (the LoRA weights also on their own axes, as `init_adapters` places them), batches of
    `training.batch_size` x `data.max_length` rows (the longest a job pads to; packing, which
    only shortens, is not modelled)."""
    c = model_config(config.model.path)
    m, t = config.model, config.training
    dtype = parse_dtype(m.dtype)
    param_dtype = parse_dtype(m.param_dtype or m.dtype)
    plans = plan_cells(config, c)
    groups: list[Group] = build_groups(plans, t.layout, mesh.shape["adapter"])
    B, T = t.batch_size, max(p.cell.config.data.max_length for p in plans)
    platform = mesh.devices.flat[0].platform
    per_pass = resolve_per_pass(t.adapters_per_pass, platform, B * T)
    # Distillation: the job caches the teacher's outputs (`distill.teacher: cache`, or `auto`
    # when they fit host memory, which depends on the data) or runs the teacher in the step
    # (`step`). `auto` is compiled as `step`: the step then holds the teacher's forward too.
    cached = (config.distill or DistillSection()).teacher == "cache"
    *_, base = abstract_module(c, None, dtype, param_dtype)
    states, batches, graphdefs, passes = [], [], [], []
    for g in groups:
        members = [plans[i if i is not None else g.slots[0]] for i in g.slots]
        placement = union_placement([p.lora for p in members])
        graphdef, w_abs, c_abs, _ = abstract_module(
            c, placement, dtype, param_dtype, m.remat, m.scan_layers
        )
        graphdefs.append(graphdef)
        n = len(g.slots)

        def build(w_abs=w_abs, c_abs=c_abs, members=members, n=n):
            weights = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), jnp.float32), w_abs)
            consts = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), jnp.float32), c_abs)
            hyper = Hyper.stack([p.hyper for p in members])
            keys = jnp.stack([jax.random.key_data(jax.random.key(0))] * n)
            return GroupState.create(
                weights, consts, hyper, keys, jnp.ones((n,), bool), t.schedule, t.steps
            )

        state = jax.eval_shape(build)
        # The weights' layer stacks [A, L, ...]: adapter, then each leaf's own axes.
        axes = [
            ("adapter", None, *v.get_metadata().get("axes", (None,) * v.get_value().ndim))
            for v in jax.tree.leaves(w_abs, is_leaf=lambda v: isinstance(v, nnx.Variable))
        ]
        stack_axes = [axes[idx[0]] for idx in state.by_layer.index]

        def per_slot(x):
            return _sharded(x, mesh, ("adapter",) + (None,) * (x.ndim - 1) if x.ndim else ())

        weights = [
            _sharded(x, mesh, a if len(a) == x.ndim else ("adapter",) + (None,) * (x.ndim - 1))
            for x, a in zip(state.weights, stack_axes, strict=True)
        ]
        # AdamW's moments split as their stacks are (`init_opt_state`), its counts per slot.
        opt = map_opt_state(
            state.opt,
            lambda m, w: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=w.sharding),
            per_slot,
            weights,
        )
        rest = jax.tree.map(per_slot, dataclasses.replace(state, weights=[], opt=None))
        states.append(dataclasses.replace(rest, weights=weights, opt=opt))
        rows = jax.ShapeDtypeStruct((n, B, T), jnp.int32)
        flags = jax.ShapeDtypeStruct((n, B, T), bool)
        batch_axes = ("adapter", "batch", None)
        batch = [_sharded(x, mesh, batch_axes) for x in (rows, flags, flags)]
        if (d := members[0].objective) is not None and cached:  # the teacher's outputs, read
            V, D = c.vocab_size, c.hidden_size
            batch.append(
                _sharded(jax.ShapeDtypeStruct((n, B, T, V), jnp.float32), mesh, (*batch_axes, None))
            )
            if d.layers:
                hidden = jax.ShapeDtypeStruct((n, B, len(d.layers), T, D), jnp.float32)
                batch.append(_sharded(hidden, mesh, (*batch_axes, None, None)))
        elif d is not None:  # each adapter's context: the step runs the teacher on it
            C = teacher_context(config, c)
            batch.append(_sharded(jax.ShapeDtypeStruct((n, C), jnp.int32), mesh, ("adapter", None)))
            batch.append(_sharded(jax.ShapeDtypeStruct((n, C), bool), mesh, ("adapter", None)))
        batches.append(tuple(batch))
        passes.append(count_passes(n // mesh.shape["adapter"], per_pass))
    cfg = StepConfig(
        graphdefs=tuple(graphdefs),
        schedule=t.schedule,
        total_steps=t.steps,
        use_dropout=any(p.lora.dropout > 0 for p in plans),
        spmd_axis_name="adapter",
        passes=tuple(passes),
        objectives=tuple(plans[g.slots[0]].objective for g in groups),
        teacher_cached=cached,
        context_offset=1 if c.bos_token_id is not None else 0,
        teacher_graphdef=abstract_module(c, None, dtype, param_dtype, m.remat, m.scan_layers)[0],
        scan_layers=m.scan_layers,
        mesh=mesh,  # platform paths follow the TPU devices, not this CPU host
    )
    step = _sharded(jax.ShapeDtypeStruct((), jnp.int32), mesh, ())
    state = TrainState(step=step, groups=tuple(states))
    base_abs = _variables(base, mesh)
    ranks = "+".join(
        f"r{union_placement([plans[i].lora for i in g.slots if i is not None]).rank}x{len(g.slots)}"
        for g in groups
    )
    name = f"train_step[{ranks}; {'x'.join(str(p) for p in passes)} pass(es)]"
    return Program(
        name,
        compile_step(cfg),
        (base_abs, state, tuple(batches)),
        plan.total,
        plan.flops_per_step / plan.devices,
        mesh,
    )


def teacher_context(config: Config, c) -> int:
    """Tokens of the widest teacher context (`cells.CellData.context_width`): the longest unit
    text and its blank line, with BOS; the units are cut as the job cuts them (with the
    model's tokenizer, or a shape preset's stand-in). Without a tokenizer or units: the
    model's positions left after a training row, the most any context can take."""
    tokenizer = local_tokenizer(config.model.path, c)
    units = expand_units(config, tokenizer)[1] if tokenizer is not None else []
    if not units:
        return c.max_position_embeddings - config.data.max_length
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return max(len(encode(u.text + "\n\n")) for u in units) + 1


def _stacked(tree, n: int):
    """A tree of n adapters' float32 leaves [n, ...] (as `init_adapters` stacks them)."""
    return jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct((n, *v.get_value().shape), jnp.float32)),
        tree,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )


def _adapter_stack(w_abs, c_abs, n: int, mesh: Mesh):
    """(weights, consts) of n adapters stacked and split over `adapter` (and their own axes) on
    `mesh`, as the job holds a stack."""
    return tuple(
        _variables(_stacked(tree, n), mesh, ("adapter",), leading_in_shape=True)
        for tree in (w_abs, c_abs)
    )


def eval_programs(config: Config, mesh: Mesh, plan: Plan) -> list[Program]:
    """Evaluation's greedy decoding as `evaluate.Evaluator` runs it (`decode_stack`), one
    program per group: each adapter of the stack continues `eval.batch_size` prompts of up to
    `data.max_length` tokens (a prompt is a training row cut before its answer) for
    `eval.max_new_tokens`, with a KV cache per adapter, adapters over `adapter` and each one's
    prompts over `fsdp`. Plan's estimate for it: `plan_decode.decode_rows`."""
    if config.eval is None:
        return []
    c = model_config(config.model.path)
    dtype = parse_dtype(config.model.dtype)
    param_dtype = parse_dtype(config.model.param_dtype or config.model.dtype)
    plans = plan_cells(config, c)
    groups = build_groups(plans, config.training.layout, mesh.shape["adapter"])
    Q, T = config.eval.batch_size, max(p.cell.config.data.max_length for p in plans)
    *_, base = abstract_module(c, None, dtype, param_dtype)
    base_abs = _variables(base, mesh)
    spec = DecodeSpec(config.eval.max_new_tokens, tuple(c.eos_token_ids) or (0,), c.pad_token_id)
    out = []
    for k, g in enumerate(groups):
        n = len(g.slots)
        placement = union_placement([plans[i].lora for i in g.slots if i is not None])
        graph, w_abs, c_abs, _ = abstract_module(c, placement, dtype, param_dtype)
        weights, consts = _adapter_stack(w_abs, c_abs, n, mesh)
        tokens = _sharded(
            jax.ShapeDtypeStruct((n, Q, T), jnp.int32), mesh, ("adapter", "batch", None)
        )
        mask = _sharded(jax.ShapeDtypeStruct((n, Q, T), bool), mesh, ("adapter", "batch", None))
        estimate = sum(b for _, b in plan.decoding[k])  # `plan_decode.decode_rows`
        out.append(
            Program(
                f"eval_decode[group {k}: r{placement.rank}x{n}, {Q} x {T} + "
                f"{spec.max_new_tokens} tokens]",
                decode_stack_for,  # traced for the mesh: part of its cache key
                (graph, base_abs, weights, consts, tokens, mask, spec, None, mesh),
                estimate,
                0.0,
                mesh,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# compile and report


@dataclasses.dataclass
class Compiled:
    """The TPU compiler's verdict on one program, per chip."""

    name: str
    estimated_bytes: float
    estimated_flops: float
    compile_s: float
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    code: int = 0
    flops: float | None = None
    # The program has loops (a scanned model's layers, a chunked loss): XLA's cost analysis
    # counts each loop's body once, so `flops` is then a lower bound, not the step's count.
    loops: bool = False
    error: str = ""  # the compiler's refusal, one line
    # a refused program's largest buffers: (bytes, op name, shape)
    largest: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> float:
        """What the chip holds while the program runs: arguments and outputs (a donated
        argument that an output reuses counted once), temporaries and the program itself. A
        refused program: its arguments and the temporaries the compiler asked for."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


# The refusal: "Ran out of memory on HBM, the total memory required for HLO temporaries
# (34.24G) exceeds available HBM (15.75G)." (libtpu 0.0.42; the figures are per chip).
_REFUSAL = re.compile(
    r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"
)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# A value of the compiler's buffer assignment (--xla_dump_to): its op, bytes and shape.
_VALUE = re.compile(r"^\s*value: <\d+ ([^ >]+)[^>]*> \(size=(\d+),offset=\d+\): (.*)$")
LARGEST = 10


def parse_refusal(message: str) -> tuple[float | None, float | None]:
    """(temporaries, usable HBM) in bytes from the compiler's RESOURCE_EXHAUSTED message."""
    if m := _REFUSAL.search(message):
        return float(m[1]) * _UNITS[m[2]], float(m[3]) * _UNITS[m[4]]
    return None, None


def largest_buffers(assignment: str, n: int = LARGEST) -> list[tuple[int, str, str]]:
    """The `n` largest values of a buffer-assignment dump: (bytes, op name, shape without its
    TPU layout), each op once."""
    best: dict[str, tuple[int, str, str]] = {}
    for line in assignment.splitlines():
        if m := _VALUE.match(line):
            size, op = int(m[2]), m[1]
            if size > best.get(op, (0,))[0]:
                best[op] = (size, op, re.sub(r"\{[^{}]*\}", "", m[3]).strip())
    return sorted(best.values(), reverse=True)[:n]


def _argument_bytes(args: tuple) -> int:
    """Bytes of a program's (abstract) arguments on one chip, from their shardings; static
    arguments (a graph definition, a decoding spec) hold none."""
    total = 0
    for x in jax.tree.leaves(args):
        if isinstance(x, jax.ShapeDtypeStruct):
            shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
            total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _refused_buffers(lowered) -> list[tuple[int, str, str]]:
    """Compile again with the compiler's dump on, for the buffers of a refused program."""
    with tempfile.TemporaryDirectory() as where:
        with contextlib.suppress(Exception):
            lowered.compile(compiler_options={"xla_dump_to": where})
        dumps = sorted(Path(where).glob("*buffer-assignment.txt"))
        return largest_buffers(dumps[-1].read_text()) if dumps else []


def compile_program(p: Program) -> Compiled:
    """Lower and compile `p` for its devices; a refusal for memory is a verdict, not an error."""
    out = Compiled(p.name, p.estimated_bytes, p.estimated_flops, 0.0)
    t0 = time.perf_counter()
    with _quiet_stderr():
        with compiling_for(p.mesh):
            lowered = p.fn.lower(*p.args)
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError; RESOURCE_EXHAUSTED is the one we expect
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            out.compile_s = time.perf_counter() - t0
            out.error = str(e).strip().splitlines()[0][:300]
            temporaries, _ = parse_refusal(str(e))
            out.arguments = _argument_bytes(p.args)
            out.temporaries = int(temporaries or 0)
            out.largest = _refused_buffers(lowered)
            return out
    out.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out.arguments, out.outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    out.aliased, out.temporaries = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    out.code = mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per device
    out.flops = float(cost["flops"]) if cost and "flops" in cost else None
    out.loops = " while(" in compiled.as_text()
    return out


@dataclasses.dataclass
class Report:
    """`plan --aot`: plan's own estimate and the compiler's figures, per chip and program."""

    topology: str
    devices: int
    device_kind: str
    hbm_bytes: float
    plan: Plan
    programs: list[Compiled]
    hbm_nominal: float = 0.0  # the chip's HBM as sold; `hbm_bytes` is what the compiler allows
    hbm_source: str = "the compiler"

    @property
    def fits(self) -> bool:
        return all(not p.error and p.total <= self.hbm_bytes for p in self.programs)

    def render(self) -> str:
        gib = lambda b: f"{b / GIB:8.2f} GiB" if abs(b) >= GIB / 10 else f"{b / 2**20:8.2f} MiB"  # noqa: E731
        lines = [
            f"--aot {self.topology}: {self.devices} x {self.device_kind} "
            f"({self.hbm_nominal / GIB:.2f} GiB HBM each, {self.hbm_bytes / GIB:.2f} usable by a "
            f"program, from {self.hbm_source}), compiled by libtpu on this machine",
        ]
        for p in self.programs:
            verdict = "fits" if not p.error and p.total <= self.hbm_bytes else "does NOT fit"
            lines.append(f"{p.name}: compiled in {p.compile_s:.1f} s, per chip:")
            if p.error:
                lines += [
                    f"  refused by the compiler ({verdict}): {p.error}",
                    f"  {'arguments':<30}{gib(p.arguments)}",
                    f"  {'temporaries':<30}{gib(p.temporaries)}",
                    f"  {'total (at least)':<30}{gib(p.total)}  of {self.hbm_bytes / GIB:.2f}",
                ]
                if p.largest:
                    lines.append("  largest buffers (op, shape):")
                    lines += [f"  {gib(b)}  {op:<24} {shape}" for b, op, shape in p.largest]
            else:
                lines += [
                    f"  {'arguments':<30}{gib(p.arguments)}",
                    f"  {'outputs':<30}{gib(p.outputs)}",
                    f"  {'aliased (donated, reused)':<30}{gib(-p.aliased)}",
                    f"  {'temporaries':<30}{gib(p.temporaries)}",
                    f"  {'program code':<30}{gib(p.code)}",
                    f"  {'total':<30}{gib(p.total)}  of {self.hbm_bytes / GIB:.2f} ({verdict})",
                ]
            ratio = f" ({p.estimated_bytes / p.total:.2f}x the compiler's)" if p.total else ""
            lines.append(f"  {'plan estimate':<30}{gib(p.estimated_bytes)}{ratio}")
            if p.flops is not None and p.loops:
                lines.append(
                    f"  FLOPs per step per chip      {p.flops:.3e}, a lower bound: XLA counts each "
                    f"loop's body once (plan {p.estimated_flops:.3e})"
                )
            elif p.flops is not None:
                lines.append(
                    f"  FLOPs per step per chip      {p.flops:.3e} (plan {p.estimated_flops:.3e}, "
                    f"{p.estimated_flops / p.flops:.2f}x)"
                )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "devices": self.devices,
            "hbm_bytes": int(self.hbm_bytes),
            "fits": self.fits,
            "programs": [
                {
                    "name": p.name,
                    "compiled_bytes": int(p.total),
                    "estimated_bytes": int(p.estimated_bytes),
                    "fits": not p.error and p.total <= self.hbm_bytes,
                    "flops": p.flops,
                    "flops_loops_once": p.loops,
                    "compile_s": round(p.compile_s, 2),
                    **({"error": p.error} if p.error else {}),
                }
                for p in self.programs
            ],
        }
