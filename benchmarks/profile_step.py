"""Where one training step of a grid goes: a `jax.profiler` trace of the compiled step, summed
by kind of operation, and every matmul shape with its measured FLOP rate.

The grid is `bench_process`'s (small-llama, ranks x PhoneBook sizes, the study's recipe);
`--set KEY=VALUE` changes a setting, e.g. `--set lora.dropout=0.0` or
`--set training.adapters_per_pass=2`. Prints seconds per step (median of `--steps` untraced
steps after the compiling one), then the traced steps' operations: per matmul shape its
milliseconds and GFLOP per step and GFLOP/s, per other kind its milliseconds per step. The
operations of a step run on several threads at once, so their sum can exceed the step.

    python -m benchmarks.profile_step
    python -m benchmarks.profile_step --set lora.dropout=0.0
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import yaml

from benchmarks.bench_process import add_grid_args, job_config
from benchmarks.common import matmul_ceiling, report
from jaxlora.config import parse_config
from jaxlora.sweep import SweepJob

TRACED = 2  # steps under the profiler


def trace_events(trace_dir: Path) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and number of calls of each named event in a perfetto trace."""
    path = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    micros, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            micros[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    return micros, calls


def _dims(shape: str) -> list[int]:
    return [int(x) for x in shape.split(",") if x]


def dot_shapes(hlo: str) -> dict[str, list[tuple[str, float]]]:
    """Per matmul or fusion instruction of the optimized HLO, its matmuls:
    (`lhs x rhs -> out`, FLOPs)."""
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    dot = re.compile(
        r"%([\w.\-]+) = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\),"
        r"[^\n]*?lhs_contracting_dims=\{([\d,]*)\}"
    )
    out: dict[str, list[tuple[str, float]]] = {}
    in_body: dict[str, list[tuple[str, float]]] = {}
    for body_name, body in re.findall(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S):
        for name, res, lhs, rhs, dims in dot.findall(body):
            k = math.prod(_dims(shapes[lhs])[int(i)] for i in dims.split(","))
            entry = (
                f"[{shapes[lhs]}] x [{shapes[rhs]}] -> [{res}]",
                2.0 * math.prod(_dims(res)) * k,
            )
            out[name] = [entry]
            in_body.setdefault(body_name, []).append(entry)
    for name, called in re.findall(r"%([\w.\-]+) = \S+ fusion\(.*?calls=%?([\w.\-]+)", hlo):
        if called in in_body:
            out[name] = in_body[called]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_grid_args(p)
    p.add_argument("--steps", type=int, default=6, help="untimed steps for seconds per step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=12, help="matmul shapes and other kinds shown")
    args = p.parse_args()

    config = parse_config(job_config(args, args.model, 300), "profile_step")
    for item in args.set:
        key, _, value = item.partition("=")
        config = config.with_value(key, yaml.safe_load(value))
    with tempfile.TemporaryDirectory() as tmp:
        job = SweepJob(config, Path(tmp) / "run", progress=False)
        state, step_fn, base = job.init_state(), job.step_function(), job.model.params
        batches = job.batches(0)[0]
        state, losses = step_fn(base, state, batches)
        jax.block_until_ready(losses)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, losses = step_fn(base, state, batches)
            jax.block_until_ready(losses)
            times.append(time.perf_counter() - t0)
        with jax.profiler.trace(str(Path(tmp) / "trace"), create_perfetto_trace=True):
            for _ in range(TRACED):
                state, losses = step_fn(base, state, batches)
            jax.block_until_ready(losses)
        micros, calls = trace_events(Path(tmp) / "trace")
        dots = dot_shapes(step_fn.lower(base, state, batches).compile().as_text())

    per_shape: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    others: collections.Counter = collections.Counter()
    for name, us in micros.items():
        if name in dots:
            for key, flops in dots[name]:  # a fusion's time goes to its (first) matmul
                per_shape[key][1] += flops * calls[name] / TRACED
            per_shape[dots[name][0][0]][0] += us / 1e3 / TRACED
        elif not name.startswith("$") and not re.search(r"Thunk|Await|Pjit|^end: ", name):
            others[re.sub(r"\.\d+$", "", name)] += us / 1e3 / TRACED
    matmul_ms = sum(ms for ms, _ in per_shape.values())
    matmul_gflop = sum(f for _, f in per_shape.values()) / 1e9
    print(
        f"s/step {statistics.median(times):.3f}; matmuls {matmul_ms:.0f} ms, {matmul_gflop:.1f}"
        f" GFLOP, {matmul_gflop / matmul_ms * 1e3:.0f} GFLOP/s"
    )
    shapes = sorted(per_shape.items(), key=lambda kv: -kv[1][0])[: args.top]
    for key, (ms, flops) in shapes:
        print(f"  {ms:7.1f} ms  {flops / 1e9:6.2f} GFLOP  {flops / ms / 1e6:6.1f} GFLOP/s  {key}")
    for kind, ms in others.most_common(args.top):
        print(f"  {ms:7.1f} ms  {kind}")
    report(
        "profile of one training step",
        {
            "model": args.model,
            "ranks": args.ranks,
            "sizes": args.sizes,
            "set": args.set,
            "adapters_per_pass": job.per_pass,
            "s_per_step": round(statistics.median(times), 4),
            "matmul_ms_per_step": round(matmul_ms, 1),
            "matmul_gflop_per_step": round(matmul_gflop, 2),
            "matmul_flops_per_s": f"{matmul_gflop / matmul_ms * 1e12:.4g}",
            "matmul_ceiling_flops_per_s": f"{matmul_ceiling():.4g}",
            "matmul_shapes": {k: [round(ms, 1), round(f / 1e9, 3)] for k, (ms, f) in shapes},
            "other_ms": {k: round(v, 1) for k, v in others.most_common(args.top)},
        },
    )


if __name__ == "__main__":
    main()
