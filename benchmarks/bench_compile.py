"""Compile time of the training step from shapes alone: 1B and 8B shapes, 1 and 10 rank groups.

The step is built as `SweepJob._step_config` and `SweepJob.init_state` build it (one graph
definition per rank group, AdamW state per adapter, dropout keys, the backend's
`adapters_per_pass`), but every input is a `jax.ShapeDtypeStruct`: the base weights of the
`*-shape` presets (the real Llama-3.2-1B and Llama-3.1-8B architectures) are never allocated.
What is timed is `jit(step).lower(abstract args)` (tracing to StableHLO) and `.compile()` (XLA),
the two costs a job pays before its first step.

Settings: the study's recipe (configs/phonebook_capacity_llama3_8b.yaml): bf16 compute and base,
`model.remat: block`, all-linear adapters with dropout 0.1, batch 8 x --seq tokens per adapter.
One rank group: --per-group adapters of rank 8. Ten rank groups: ranks 2, 4, ..., 20 with
--per-group adapters each. `--layers unrolled|scan|both` picks `model.scan_layers`. With
`--layout auto` the ranks are stacked as `training.layout: auto` stacks them for the same job
on one device of --device-memory GiB (default 80: an H100), instead of one stack per rank.

    python -m benchmarks.bench_compile                        # 1B and 8B, 1 and 10 groups, both
    python -m benchmarks.bench_compile --shapes llama-3.2-1b-shape --groups 1 --layers unrolled
    python -m benchmarks.bench_compile --layers scan --layout auto
    python -m benchmarks.bench_compile --generate 32              # generation, not the step
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import report, zero_group
from jaxlora.cells import count_passes, plan_cells, resolve_per_pass
from jaxlora.config import load_config
from jaxlora.lora import LoRAConfig, union_placement
from jaxlora.models.model import Model, abstract_module, parse_dtype
from jaxlora.models.presets import PRESETS
from jaxlora.plan import GIB, choose_layout
from jaxlora.sharding import logical_spec, make_mesh, variable_sharding
from jaxlora.train import StepConfig, TrainState, compile_step


def _abstract(tree: nnx.State, mesh) -> nnx.State:
    """ShapeDtypeStructs of a parameter tree, sharded as the job shards it."""

    def one(var):
        x = var.get_value()
        return var.replace(
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=variable_sharding(var, mesh))
        )

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_step(shape: str, stacks: list[tuple[int, int]], args, scan: bool):
    """(jitted step, abstract base, abstract state, abstract batches) of a job on `shape` whose
    stacks are (rank, adapters) pairs."""
    config = PRESETS[shape].config
    dtype = parse_dtype(args.dtype)
    mesh = make_mesh(-1, 1, 1)
    model = Model(config, params=None, dtype=dtype, param_dtype=dtype, mesh=mesh)
    _, _, _, base = abstract_module(config, None, dtype, dtype)
    base = _abstract(base, mesh)
    platform = jax.default_backend()
    per_pass = resolve_per_pass("auto", platform, args.batch * args.seq)
    groups, graphdefs, passes, batches = [], [], [], []
    for rank, per_group in stacks:
        loras = [LoRAConfig(rank, dropout=0.1).validate(config)] * per_group
        placement = union_placement(loras)
        graphdefs.append(model.graph(placement, remat=args.remat, scan_layers=scan))
        _, w_abs, c_abs, _ = abstract_module(config, placement, dtype, dtype)

        g = jax.eval_shape(functools.partial(zero_group, w_abs, c_abs, len(loras)))
        # every per-adapter leaf split on `adapter` (one device here: the same layout, whole)
        groups.append(
            jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    x.shape,
                    x.dtype,
                    sharding=jax.sharding.NamedSharding(
                        mesh, logical_spec(("adapter",) + (None,) * (x.ndim - 1), x.shape, mesh)
                    ),
                ),
                g,
            )
        )
        passes.append(count_passes(per_group, per_pass))
        tokens = jax.ShapeDtypeStruct((per_group, args.batch, args.seq), jnp.int32)
        flags = jax.ShapeDtypeStruct((per_group, args.batch, args.seq), bool)
        batches.append((tokens, flags, flags))
    cfg = StepConfig(
        graphdefs=tuple(graphdefs),
        schedule="cosine",
        total_steps=1500,
        use_dropout=True,
        spmd_axis_name="adapter",
        passes=tuple(passes),
        scan_layers=scan,
    )
    step = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=step, groups=tuple(groups))
    return compile_step(cfg), base, state, tuple(batches), mesh


def auto_layout(shape: str, ranks: list[int], args) -> tuple[int, ...]:
    """What `training.layout: auto` picks for this job (the study's config with these ranks and
    --per-group sizes each) on one device of --device-memory GiB."""
    sizes = [1000 * 2**i for i in range(args.per_group)]
    config = load_config(
        Path(__file__).parents[1] / "configs" / "phonebook_capacity_llama3_8b.yaml",
        [
            f"model.path={shape}",
            f"sweep.lora.rank={ranks}",
            f"sweep.data.size_tokens={sizes}",
            f"training.batch_size={args.batch}",
            f"data.max_length={args.seq}",
            f"model.remat={args.remat}",
        ],
    )
    c = PRESETS[shape].config
    one = {"adapter": 1, "fsdp": 1, "tensor": 1}
    return choose_layout(config, c, plan_cells(config, c), one, args.device_memory * GIB)[0]


def measure(shape: str, n_groups: int, args, scan: bool) -> dict:
    ranks = [8] if n_groups == 1 else [2 * (i + 1) for i in range(n_groups)]
    if args.layout == "auto":
        tops = auto_layout(shape, ranks, args)
        bucket = [next(t for t in tops if r <= t) for r in ranks]
        stacks = [(t, args.per_group * bucket.count(t)) for t in tops]
    else:
        stacks = [(r, args.per_group) for r in ranks]
    step_fn, base, state, batches, mesh = abstract_step(shape, stacks, args, scan)
    del mesh  # as in a job: the inputs' shardings carry the mesh
    t0 = time.perf_counter()
    lowered = step_fn.lower(base, state, batches)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    return {
        "shape": shape,
        "layers": PRESETS[shape].config.num_layers,
        "groups": n_groups,
        "stacks": [r for r, _ in stacks],
        "mode": "scan" if scan else "unrolled",
        "lower_s": round(t1 - t0, 1),
        "compile_s": round(t2 - t1, 1),
        "total_s": round(t2 - t0, 1),
        "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2) if mem else None,
    }


def measure_generate(shape: str, args) -> dict:
    """Compile of base-model generation (`jaxlora.generate`): prefill of --batch x --seq
    prompt tokens, then --generate new tokens. Decoding runs its layers unrolled (a KV cache
    is updated in place per layer), so this grows with depth."""
    from jaxlora.generate import DecodeSpec, _generate_base

    config = PRESETS[shape].config
    dtype = parse_dtype(args.dtype)
    graphdef, _, _, base = abstract_module(config, None, dtype, dtype)
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((args.batch, args.seq), bool)
    spec = DecodeSpec(args.generate, tuple(config.eos_token_ids) or (0,), 0)
    t0 = time.perf_counter()
    lowered = _generate_base.lower(graphdef, base, tokens, mask, spec, None)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {
        "shape": shape,
        "layers": config.num_layers,
        "lower_s": round(t1 - t0, 1),
        "compile_s": round(t2 - t1, 1),
        "total_s": round(t2 - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama-3.2-1b-shape", "llama-3.1-8b-shape"])
    p.add_argument("--groups", nargs="+", type=int, default=[1, 10])
    p.add_argument("--layers", choices=("unrolled", "scan", "both"), default="both")
    p.add_argument("--per-group", type=int, default=2, help="adapters per rank group")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="block", choices=("none", "block"))
    p.add_argument(
        "--layout",
        choices=("groups", "auto"),
        default="groups",
        help="groups: one stack per rank; auto: the stacks training.layout: auto picks",
    )
    p.add_argument(
        "--device-memory", type=float, default=80.0, help="GiB per device, for --layout auto"
    )
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        help="new tokens: time the compile of base-model generation instead of the step",
    )
    args = p.parse_args()
    if args.generate:
        measure_generate("tiny-llama", args)  # warm-up, as for the step below
        rows = [measure_generate(shape, args) for shape in args.shapes]
        for r in rows:
            print(f"{r['shape']:>20} L={r['layers']:<3} generate: total {r['total_s']:6.1f}s")
        report("bench_compile --generate", {"settings": vars(args), "rows": rows})
        return
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        raise SystemExit("unset JAX_COMPILATION_CACHE_DIR: a cache hit is not a compile")
    modes = {"unrolled": [False], "scan": [True], "both": [False, True]}[args.layers]
    # Warm-up (backend start, first-use tracing caches), so the first row is not charged for it.
    measure("tiny-llama", 1, argparse.Namespace(**{**vars(args), "layout": "groups"}), False)
    rows = []
    for shape in args.shapes:
        for scan in modes:
            for n in args.groups:
                rows.append(measure(shape, n, args, scan))
                r = rows[-1]
                print(
                    f"{r['shape']:>20} L={r['layers']:<3} {r['mode']:>8} groups={r['groups']:<3}"
                    f" stacks={r['stacks']}"
                    f" lower {r['lower_s']:6.1f}s compile {r['compile_s']:6.1f}s"
                    f" total {r['total_s']:6.1f}s",
                    flush=True,
                )
    print("\n| shape | L | layers | rank groups | lower s | compile s | total s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['layers']} | {r['mode']} | {r['groups']} | {r['lower_s']} "
            f"| {r['compile_s']} | {r['total_s']} |"
        )
    ratios = {}
    by = {(r["shape"], r["mode"], r["groups"]): r["total_s"] for r in rows}
    big, small = "llama-3.1-8b-shape", "llama-3.2-1b-shape"
    for mode in ("unrolled", "scan"):
        g10, g1 = by.get((big, mode, 10)), by.get((big, mode, 1))
        s10 = by.get((small, mode, 10))
        if g10 and g1:
            ratios[f"{mode}: 8B 10 groups / 1 group (target <= 2)"] = round(g10 / g1, 2)
        if g10 and s10:
            ratios[f"{mode}: 8B / 1B, 10 groups (target <= 1.5)"] = round(g10 / s10, 2)
    for k, v in ratios.items():
        print(f"{k}: {v}")
    report("bench_compile", {"settings": vars(args), "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
