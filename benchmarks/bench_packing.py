"""Packed vs unpacked training steps: the same job, `training.packing` true and false.

Both layouts train on the same rows per adapter per step (tests/test_packing.py); the packed
one lays them end to end. Reported per layout: positions computed per adapter-step (B x width
unpacked, the static packed length packed), seconds per step (median of `--steps` timed steps
after one untimed compiling step), and what `auto` picks.

    python -m benchmarks.bench_packing                              # the quickstart grid
    python -m benchmarks.bench_packing --model small-llama --loss-mask full --per-pass 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.common import report
from jaxlora.config import load_config
from jaxlora.data.stream import choose_packing
from jaxlora.sweep import SweepJob


def time_steps(job: SweepJob, steps: int) -> list[float]:
    state, step_fn, params = job.init_state(), job.step_function(), job.model.params
    state, losses = step_fn(params, state, job.batches(0)[0])
    jax.block_until_ready(losses)
    times = []
    for step in range(1, steps + 1):
        batches = job.batches(step)[0]
        t0 = time.perf_counter()
        state, losses = step_fn(params, state, batches)
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--model", default=None, help="model.path override")
    p.add_argument("--loss-mask", default=None, choices=["full", "completion_only"])
    p.add_argument("--per-pass", type=int, default=None, help="training.adapters_per_pass")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--set", nargs="*", default=[], help="more key=value overrides")
    args = p.parse_args(argv)

    sets = ["eval=null", "memory=null", *args.set]
    if args.model:
        sets.append(f"model.path={args.model}")
    if args.loss_mask:
        sets.append(f"data.loss_mask={args.loss_mask}")
    if args.per_pass:
        sets.append(f"training.adapters_per_pass={args.per_pass}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in ("false", "true"):
            config = load_config(args.config, [*sets, f"training.packing={packing}"])
            job = SweepJob(config, Path(tmp) / packing, progress=False)
            B, width = config.training.batch_size, job.data.width
            positions = job.data.packed_length if job.packed else B * width
            times = time_steps(job, args.steps)
            rows[packing] = dict(positions=positions, s_per_step=statistics.median(times))
            auto, why = choose_packing(
                "auto",
                width=width,
                batch_size=B,
                length=job.data.packed_length,
                fsdp=job.mesh.shape["fsdp"],
            )
    speedup = rows["false"]["s_per_step"] / rows["true"]["s_per_step"]
    print(f"{'layout':<10}{'positions/adapter-step':>24}{'s/step':>10}")
    for k, r in rows.items():
        name = "packed" if k == "true" else "rows"
        print(f"{name:<10}{r['positions']:>24}{r['s_per_step']:>10.3f}")
    print(f"packed speedup {speedup:.2f}x; auto picks {'packed' if auto else 'rows'} ({why})")
    report(
        "bench_packing",
        {"config": args.config, "sets": sets, **rows, "speedup": speedup, "auto_packs": auto},
    )


if __name__ == "__main__":
    main()
