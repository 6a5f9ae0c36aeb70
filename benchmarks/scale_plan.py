"""How to run the study's 400-cell Llama-3.1-8B grid (PhoneBook + CounterFact, 10 ranks x 20
sizes each) on a given set of accelerators, from `jaxlora plan` alone (nothing is allocated).

The whole grid does not fit one job anywhere (a rank-1024 all-linear adapter with its AdamW
state is ~43 GB), so the grid is cut into jobs: ranks are taken in increasing order and packed
into one job while it fits; a rank whose 20 sizes do not fit together is split into jobs of
fewer sizes. For every job the script prints one line from its `jaxlora plan`: adapters,
per-device memory, FLOPs per step and the step time; then the total.

    python -m benchmarks.scale_plan --devices 8 --device h100
    python -m benchmarks.scale_plan --devices 64 --device tpu-v5e
"""

from __future__ import annotations

import argparse

from jaxlora.cli import DEVICES
from jaxlora.config import load_config
from jaxlora.models.model import model_config
from jaxlora.plan import GIB, Plan, flops_per_token, make_plan

CONFIGS = (
    "configs/phonebook_capacity_llama3_8b.yaml",
    "configs/counterfact_capacity_llama3_8b.yaml",
)
SHAPE = "llama-3.1-8b-shape"  # the real architecture with random weights: no download


def plan_jobs(path: str, args: argparse.Namespace) -> list[Plan]:
    """Cut one capacity grid into jobs that fit `args.devices` devices."""
    memory, peak = DEVICES[args.device]
    sweep = dict(load_config(path, [f"model.path={SHAPE}"]).sweep)
    size_key = next(k for k in sweep if k.startswith("data.size"))
    ranks, sizes = list(sweep["lora.rank"]), list(sweep[size_key])

    def plan(rs: list[int], ss: list) -> Plan:
        sets = [
            f"model.path={SHAPE}",
            f"sweep.lora.rank={rs}",
            f"sweep.{size_key}={ss}",
            "mesh.adapter=-1",
            f"mesh.fsdp={args.fsdp}",
            f"mesh.tensor={args.tensor}",
        ]
        config = load_config(path, sets)
        return make_plan(config, args.devices, memory / GIB, peak / 1e12, args.mfu)

    jobs: list[Plan] = []
    current: list[int] = []
    for r in ranks:
        if plan([*current, r], sizes).fits:
            current.append(r)
            continue
        if current:
            jobs.append(plan(current, sizes))
            current = []
        if plan([r], sizes).fits:
            current = [r]
            continue
        chunk = len(sizes)
        while chunk > 1 and not plan([r], sizes[:chunk]).fits:
            chunk -= 1
        jobs += [plan([r], sizes[i : i + chunk]) for i in range(0, len(sizes), chunk)]
    if current:
        jobs.append(plan(current, sizes))
    return jobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--device", default="h100", choices=sorted(DEVICES))
    p.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp of every job")
    p.add_argument("--tensor", type=int, default=1, help="mesh.tensor of every job")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
    args = p.parse_args()
    memory, peak = DEVICES[args.device]
    c = model_config(SHAPE)
    per_token = flops_per_token(c, 0)
    print(
        f"{args.devices} x {args.device}: {memory / GIB:.1f} GiB and {peak / 1e12:.0f} TFLOP/s "
        f"(bf16) each; every job on mesh fsdp={args.fsdp} x tensor={args.tensor} x adapter=rest"
    )
    print(
        f"{SHAPE}: FLOPs per trained token = 4 x (non-embedding parameters + lm_head) = "
        f"{per_token / 1e9:.1f} GFLOP (+ 6 x LoRA parameters per adapter); assumed MFU {args.mfu:.0%}"
    )
    total_hours = 0.0
    for path in CONFIGS:
        print(f"\n== {path}")
        for plan in plan_jobs(path, args):
            sweep = dict(plan.config.sweep)
            size_key = next(k for k in sweep if k.startswith("data.size"))
            sizes = sweep[size_key]
            hours = plan.step_seconds * plan.config.training.steps / 3600
            total_hours += hours
            fits = "" if plan.fits else "  DOES NOT FIT: more devices or a larger fsdp/tensor"
            print(
                f"ranks {list(sweep['lora.rank'])} x {len(sizes)} sizes ({sizes[0]}..{sizes[-1]}): "
                f"{plan.adapters} adapters, {plan.total / GIB:.1f} GiB/device, "
                f"{plan.tokens_per_step:,} tokens x {plan.flops_per_step / plan.tokens_per_step / 1e9:.1f} "
                f"GFLOP = {plan.flops_per_step:.3g} FLOP/step -> {plan.step_seconds:.2f} s/step, "
                f"{hours:.2f} h for {plan.config.training.steps} steps{fits}"
            )
    print(f"\ntotal: {total_hours:.1f} h of {args.devices} x {args.device} for the 400 adapters")


if __name__ == "__main__":
    main()
