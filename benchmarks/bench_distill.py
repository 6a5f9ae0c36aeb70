"""Distillation's teacher computed in every step vs cached per sample (`distill.teacher`).

The same job three ways: next-token prediction (no teacher, rows unpacked as distillation
keeps them: the floor), distillation with the teacher's forward inside the step, and
distillation reading the teacher's outputs cached before training. Reported per way: seconds to set the job up (the cache is built there), seconds per
step (median of `--steps` timed steps after one untimed compiling step), the cache's size, and
the seconds a whole `training.steps` run would take (setup + steps x s/step).

    python -m benchmarks.bench_distill                       # configs/distill_tiny.yaml
    python -m benchmarks.bench_distill --set distill.layers=all
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_packing import time_steps
from benchmarks.common import report
from jaxlora.config import load_config
from jaxlora.sweep import SweepJob

WAYS = {
    "ntp": ["training.objective=ntp", "distill=null", "training.packing=false"],
    "distill, teacher in step": ["training.objective=distill", "distill.teacher=step"],
    "distill, teacher cached": ["training.objective=distill", "distill.teacher=cache"],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/distill_tiny.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--set", nargs="*", default=[], help="more key=value overrides")
    args = p.parse_args(argv)

    sets = ["memory=null", "eval=null", "sweep.training.objective=null", *args.set]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (way, extra) in enumerate(WAYS.items()):
            config = load_config(args.config, [*sets, *extra])
            t0 = time.perf_counter()
            job = SweepJob(config, Path(tmp) / str(i), progress=False)
            setup = time.perf_counter() - t0
            step = statistics.median(time_steps(job, args.steps))
            cache = job.data.teacher_cache_bytes
            rows[way] = dict(
                setup_s=setup,
                s_per_step=step,
                cache_mib=cache / 2**20,
                run_s=setup + config.training.steps * step,
            )
    print(f"{'':<26}{'setup s':>9}{'s/step':>9}{'cache MiB':>11}{'run s':>8}")
    for way, r in rows.items():
        print(
            f"{way:<26}{r['setup_s']:>9.2f}{r['s_per_step']:>9.3f}"
            f"{r['cache_mib']:>11.1f}{r['run_s']:>8.1f}"
        )
    step, cached = rows["distill, teacher in step"], rows["distill, teacher cached"]
    print(f"cached / in-step, whole run: {cached['run_s'] / step['run_s']:.2f}")
    report("bench_distill", {"config": args.config, "sets": sets, **rows})


if __name__ == "__main__":
    main()
