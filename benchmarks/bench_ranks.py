"""Mixed ranks in one job: rank groups vs one stack zero-padded to the largest rank.

One adapter per rank in {2, 4, ..., --max-rank} (the study's rank axis, up to what the model's
narrowest projection allows: 128 for small-llama, whose k/v projections are 128 wide), the
study's PhoneBook recipe, batch 8. `training.layout: groups` keeps one stack per rank, each
evaluated in the same compiled step; `padded` pads every adapter to the largest rank and runs
one stack; `auto` (the default) pads a rank into the next stack where that costs <= 5% FLOPs.
All give the same
adapters (tests/test_train.py); this measures seconds per step and memory: the step's buffers
as XLA plans them (`memory_analysis` of the compiled step: arguments + temporaries) and the
adapter state alone (weights, AdamW moments).

    python -m benchmarks.bench_ranks --model small-llama --max-rank 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.bench_sweep import grid_config
from benchmarks.common import report
from jaxlora.sweep import SweepJob

MIB = 2**20


def measure(args: argparse.Namespace, layout: str, out: Path) -> dict:
    args.layout = layout
    ranks = [2**k for k in range(1, args.max_rank.bit_length())]
    job = SweepJob(grid_config(args, {"lora.rank": ranks}), out / layout, progress=False)
    state, step_fn, params = job.init_state(), job.step_function(), job.model.params
    t0 = time.perf_counter()
    compiled = step_fn.lower(params, state, job.batches(0)[0]).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state_bytes = sum(x.nbytes for g in state.groups for x in jax.tree.leaves((g.weights, g.opt)))
    state, losses = compiled(params, state, job.batches(0)[0])
    times = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        state, losses = compiled(params, state, job.batches(step)[0])
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - t0)
    return {
        "layout": layout,
        "ranks": ranks,
        "stacks": len(job.groups),
        "layout_chosen": job.config.training.layout,
        "s_per_step": round(float(np.median(times)), 3),
        "compile_s": round(compile_s, 1),
        "step_buffers_mib": round(
            (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / MIB, 1
        ),
        "step_temporaries_mib": round(memory.temp_size_in_bytes / MIB, 1),
        "adapter_state_mib": round(state_bytes / MIB, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="small-llama")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU)")
    p.add_argument("--max-rank", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size-tokens", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    args.rank, args.remat = 8, "none"
    args.dtype = args.dtype or ("float32" if jax.devices()[0].platform == "cpu" else "bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args, layout, Path(tmp)) for layout in ("groups", "padded", "auto")]
    groups, padded, auto = rows
    report(
        "mixed ranks: rank groups vs padding to the largest rank",
        {
            "model": args.model,
            "rows": rows,
            "padded_over_groups_time": round(padded["s_per_step"] / groups["s_per_step"], 2),
            "padded_over_groups_buffers": round(
                padded["step_buffers_mib"] / groups["step_buffers_mib"], 2
            ),
            "auto_over_groups_time": round(auto["s_per_step"] / groups["s_per_step"], 2),
        },
    )


if __name__ == "__main__":
    main()
