"""Whole processes: one `jaxlora train` job of a grid vs the study's PyTorch + PEFT loop.

What a user waits for, start-up to exported adapters: a grid of `--ranks` x `--sizes` PhoneBook
adapters (the study's recipe: LoRA on all linear layers, alpha = r, dropout 0.1, AdamW with
weight decay 0.01, cosine decay, clipping at 1.0, batch 8, loss on every token), `--steps` steps
each, trained

  (a) by `jaxlora train config.yaml` with the config's defaults (adapters_per_pass, layout and
      packing `auto`; checkpoints as configured; the persistent compilation cache off, so every
      compile is paid), evaluation off;
  (b) by the study's loop, one adapter after another in one Python process: load the base with
      transformers, `get_peft_model`, train on the same token batches as (a), `save_pretrained`.

Both read the same base checkpoint from disk. The PEFT process gets its batches ready-made
(written before the clock starts), while the jaxlora process builds its own data: any doubt
goes to PEFT's side. It is also one process for the whole grid, where the study started one
per cell. Each side runs `--repeat` times; the median wall time counts.

The jaxlora job is also run with `--short-steps` steps, which splits its wall time into a fixed
part (start-up, loading, compiling, export) and seconds per step:
    per step = (T(steps) - T(short)) / (steps - short),   fixed = T(short) - short x per step

    python -m benchmarks.bench_process --model small-llama --steps 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import report


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """The grid's options (`job_config` reads them)."""
    p.add_argument("--model", default="small-llama", help="a preset (random weights)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--sizes", type=int, nargs="+", default=[125, 250, 500, 1000])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute and base dtype of both sides (adapters and optimizer state stay float32)",
    )


def job_config(args: argparse.Namespace, base: Path, steps: int) -> dict:
    """The grid's configuration, as a user would write it."""
    return {
        "model": {"path": str(base), "dtype": args.dtype},
        "lora": {"rank": args.ranks[0], "alpha": None, "targets": "all-linear", "dropout": 0.1},
        "data": {
            "dataset": "phonebook",
            "size_tokens": args.sizes[0],
            "chat_template": True,
            "loss_mask": "full",
            "max_length": args.max_length,
        },
        "training": {
            "steps": steps,
            "batch_size": args.batch,
            "lr": 5.0e-5,
            "schedule": "cosine",
            "weight_decay": 0.01,
            "clip_norm": 1.0,
            "log_every": max(steps // 10, 1),
        },
        "eval": None,
        "sweep": {"lora.rank": args.ranks, "data.size_tokens": args.sizes},
    }


def prepare(args: argparse.Namespace, tmp: Path) -> Path:
    """Write the base checkpoint and every cell's batches for the PEFT process (untimed)."""
    from jaxlora.config import parse_config
    from jaxlora.models.model import from_preset
    from jaxlora.sweep import SweepJob

    base = tmp / "base"
    from_preset(args.model).save_hf(base)
    job = SweepJob(parse_config(job_config(args, base, args.steps), "bench"), tmp / "plan")
    cells = tmp / "cells"
    cells.mkdir()
    for i, plan in enumerate(job.plans):
        batches = [job.data.batch(plan, step) for step in range(args.steps)]
        np.savez(
            cells / f"{i:03d}.npz",
            tokens=np.stack([b[0] for b in batches]),
            valid=np.stack([b[1] for b in batches]),
            loss=np.stack([b[2] for b in batches]),
            rank=plan.lora.rank,
            alpha=plan.lora.alpha,
            dropout=plan.lora.dropout,
        )
    return base


def peft_worker(base: Path, cells: Path, out: Path, steps: int, dtype: str) -> None:
    """The study's loop over the cells, one adapter after another (run in its own process).
    In bfloat16 the base is loaded so, as the study loads it; PEFT keeps the adapters in
    float32 (`autocast_adapter_dtype`), as jaxlora does."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    for cell in sorted(cells.glob("*.npz")):
        data = np.load(cell)
        model = get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)),
            LoraConfig(
                r=int(data["rank"]),
                lora_alpha=float(data["alpha"]),
                target_modules="all-linear",
                lora_dropout=float(data["dropout"]),
                task_type="CAUSAL_LM",
            ),
        )
        model.train()
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=5.0e-5, weight_decay=0.01
        )
        sched = transformers.get_cosine_schedule_with_warmup(opt, 0, steps)
        for step in range(steps):
            ids = torch.from_numpy(data["tokens"][step]).long()
            valid = torch.from_numpy(data["valid"][step]).long()
            labels = torch.where(torch.from_numpy(data["loss"][step]), ids, -100)
            model(input_ids=ids, attention_mask=valid, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.save_pretrained(out / cell.stem)


def wall(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> float:
    """Seconds from starting `cmd` to its exit (which must be 0); its stderr goes to `log`."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    if log is not None:
        log.write_text(done.stderr)
    return seconds


def jaxlora_run(args: argparse.Namespace, tmp: Path, base: Path, steps: int, name: str) -> float:
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(job_config(args, base, steps)))
    env = {**os.environ, "JAXLORA_COMPILATION_CACHE": "off"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = ["jaxlora", "train", str(config), "--out", str(tmp / name), "--overwrite"]
    return wall([*cmd, "--no-progress"], env, args.logs and args.logs / f"{name}.log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_grid_args(p)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--short-steps", type=int, default=30)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--no-peft", action="store_true", help="time the jaxlora job only")
    p.add_argument("--logs", type=Path, help="keep the jaxlora jobs' logs in this directory")
    p.add_argument(
        "--peft-worker", nargs=3, metavar=("BASE", "CELLS", "OUT"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.peft_worker:
        peft_worker(*map(Path, args.peft_worker), args.steps, args.dtype)
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = prepare(args, tmp)
        results: dict = {"model": args.model, "adapters": len(args.ranks) * len(args.sizes)}
        runs = {
            "jaxlora_s": lambda: jaxlora_run(args, tmp, base, args.steps, "run"),
            "jaxlora_short_s": lambda: jaxlora_run(args, tmp, base, args.short_steps, "short"),
        }
        if not args.no_peft:
            worker = [sys.executable, "-m", "benchmarks.bench_process", "--steps", str(args.steps)]
            worker += ["--dtype", args.dtype]
            peft_args = ["--peft-worker", str(base), str(tmp / "cells"), str(tmp / "peft")]
            runs["peft_s"] = lambda: wall([*worker, *peft_args])
        for name, run in runs.items():
            times = [run() for _ in range(args.repeat)]
            results[name] = round(statistics.median(times), 1)
            print(f"{name}: {times}", flush=True)
        per_step = (results["jaxlora_s"] - results["jaxlora_short_s"]) / (
            args.steps - args.short_steps
        )
        results["jaxlora_s_per_step"] = round(per_step, 3)
        results["jaxlora_fixed_s"] = round(
            results["jaxlora_short_s"] - args.short_steps * per_step, 1
        )
        if "peft_s" in results:
            results["jaxlora_vs_peft"] = round(results["peft_s"] / results["jaxlora_s"], 2)
    settings = {k: v for k, v in vars(args).items() if k not in ("peft_worker", "logs")}
    report("whole processes: jaxlora train vs the PyTorch + PEFT loop", {**settings, **results})


if __name__ == "__main__":
    main()
