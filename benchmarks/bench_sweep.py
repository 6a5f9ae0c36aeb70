"""Training a grid of A adapters: one jaxlora job vs one adapter at a time vs PyTorch + PEFT.

For each A, the same A PhoneBook adapters (one phonebook per adapter, `data.seed` = 0..A-1) are
trained three ways on the same token batches:

  (a) one jaxlora job: every adapter in one jitted, vmapped step;
  (b) jaxlora, one adapter at a time: a one-cell job per adapter, run back to back
      (`--no-single` skips it, and with it (c));
  (c) PyTorch + PEFT, one adapter at a time, the study's recipe (docs/study.md §1: LoRA on all
      linear layers, alpha = r, dropout 0.1; AdamW with weight decay 0.01, cosine decay, gradient
      clipping at 1.0; loss on every non-pad token of the chat-formatted row).

Every path first takes `--warmup` untimed steps (compilation for jaxlora, allocator warm-up for
PyTorch); compile time is reported in its own column. Then `--steps` steps are timed. From the
measured seconds per step of all A adapters:

    trained tokens/s   = real (non-padding) tokens in the timed batches / seconds
    model FLOP/s       = tokens/s x FLOPs per token, where FLOPs per token =
                         4 x (non-embedding base parameters + lm_head) + 6 x LoRA parameters
    MFU                = model FLOP/s / the FLOP/s of a large matmul measured in this run
                         (float32 on CPU, bfloat16 on GPU/TPU)
    adapters/hour      = 3600 x A / (seconds per step x `--train-steps`), i.e. projected to the
                         study's 1500 steps per adapter, compilation excluded

    python -m benchmarks.bench_sweep --model small-llama --adapters 1 4 16 64 --peft
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.common import matmul_ceiling, report
from jaxlora.cells import CellPlan, JobData
from jaxlora.config import Config, parse_config
from jaxlora.lora import LoRAConfig
from jaxlora.models.model import model_config
from jaxlora.plan import flops_per_token
from jaxlora.sweep import SweepJob

STUDY_STEPS = 1500


def grid_config(args: argparse.Namespace, sweep: dict[str, list]) -> Config:
    """The study's PhoneBook recipe on `args.model`, one adapter per cell of `sweep`."""
    raw = {
        "model": {
            "path": args.model,
            "dtype": args.dtype,
            "remat": args.remat,
            "scan_layers": args.scan_layers,
        },
        "lora": {"rank": args.rank, "alpha": None, "targets": "all-linear", "dropout": 0.1},
        "data": {
            "dataset": "phonebook",
            "size_tokens": args.size_tokens,
            "chat_template": True,
            "loss_mask": "full",
            "max_length": args.max_length,
        },
        "training": {
            "steps": STUDY_STEPS,
            "batch_size": args.batch,
            "lr": 5.0e-5,
            "schedule": "cosine",
            "weight_decay": 0.01,
            "clip_norm": 1.0,
            "layout": args.layout,
        },
        "mesh": {"adapter": -1, "fsdp": 1, "tensor": 1},
        "eval": None,
    }
    return parse_config({**raw, "sweep": sweep}, "bench_sweep")


def time_job(job: SweepJob, warmup: int, steps: int) -> tuple[float, float, int]:
    """(seconds of the first `warmup` steps, seconds of the next `steps`, real tokens in them)."""
    state, step_fn, params = job.init_state(), job.step_function(), job.model.params
    t0 = time.perf_counter()
    for step in range(warmup):
        state, losses = step_fn(params, state, job.batches(step)[0])
    jax.block_until_ready(losses)
    first = time.perf_counter() - t0
    tokens = 0
    t0 = time.perf_counter()
    for step in range(warmup, warmup + steps):
        batches, n = job.batches(step)
        state, losses = step_fn(params, state, batches)
        tokens += n
    jax.block_until_ready(losses)
    return first, time.perf_counter() - t0, tokens


def peft_loop(
    config: Config, data: JobData, plan: CellPlan, base_dir: Path, warmup: int, steps: int
) -> tuple[float, int]:
    """The study's PyTorch + PEFT training of one cell on the same batches as jaxlora:
    (seconds of the timed steps, real tokens in them)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    if config.model.remat == "block":
        base.gradient_checkpointing_enable()
    model = get_peft_model(
        base,
        LoraConfig(
            r=plan.lora.rank,
            lora_alpha=plan.lora.alpha,
            target_modules="all-linear",
            lora_dropout=plan.lora.dropout,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    hyper = plan.cell.config.training
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=hyper.lr,
        weight_decay=hyper.weight_decay,
    )
    sched = transformers.get_cosine_schedule_with_warmup(opt, 0, hyper.steps)
    tokens = 0
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids, valid, loss_mask = (torch.from_numpy(x).to(device) for x in data.batch(plan, step))
        ids = ids.long()
        labels = torch.where(loss_mask, ids, torch.full_like(ids, -100))
        loss = model(input_ids=ids, attention_mask=valid.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hyper.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(valid.sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def measure(args: argparse.Namespace, A: int, ceiling: float, out: Path) -> dict:
    seeds = list(range(A))
    c = model_config(args.model)
    per_token = flops_per_token(c, LoRAConfig(rank=args.rank).num_params(c))

    def figures(prefix: str, seconds: float, tokens: int) -> dict:
        per_step = seconds / args.steps
        return {
            f"{prefix}_s_per_step": round(per_step, 4),
            f"{prefix}_tokens_per_s": round(tokens / seconds, 1),
            f"{prefix}_mfu": round(tokens / seconds * per_token / ceiling, 3),
            f"{prefix}_adapters_per_hour": round(3600 * A / (per_step * args.train_steps), 2),
        }

    row: dict = {"adapters": A}
    variants: list[str] = []
    for per_pass in args.adapters_per_pass:
        name = "one_job" if per_pass == "all" else f"one_job_pass{per_pass}"
        config = grid_config(args, {"data.seed": seeds}).with_value(
            "training.adapters_per_pass", None if per_pass == "all" else int(per_pass)
        )
        grid = SweepJob(config, out / f"grid{A}", progress=False)
        first, seconds, tokens = time_job(grid, args.warmup, args.steps)
        row |= {f"{name}_compile_s": round(first, 2), **figures(name, seconds, tokens)}
        stats = jax.devices()[0].memory_stats()  # None on CPU
        if stats and "peak_bytes_in_use" in stats:  # the process's peak so far (A ascends)
            row[f"{name}_peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
        variants.append(name)
        del grid

    if args.no_single:
        return row
    first_total = seconds = 0.0
    tokens = 0
    cells = []  # what the PEFT loop needs of each one-cell job: its config, data and plan
    for seed in seeds:
        job = SweepJob(
            grid_config(args, {"data.seed": [seed]}), out / f"single{seed}", progress=False
        )
        f, s, n = time_job(job, args.warmup, args.steps)
        first_total, seconds, tokens = first_total + f, seconds + s, tokens + n
        cells.append((job.config, job.data, job.plans[0]))
        if args.peft and not (out / "hf_base").exists():
            job.model.save_hf(out / "hf_base")
    row |= {
        "one_at_a_time_first_steps_s": round(first_total, 2),
        **figures("one_at_a_time", seconds, tokens),
    }
    baselines = ["one_at_a_time"]
    if args.peft:
        seconds, tokens = 0.0, 0
        for cell in cells:
            s, n = peft_loop(*cell, out / "hf_base", args.warmup, args.steps)
            seconds, tokens = seconds + s, tokens + n
        row |= figures("peft", seconds, tokens)
        baselines.append("peft")
    for name in variants:
        for other in baselines:
            row[f"{name}_vs_{other}"] = round(
                row[f"{name}_adapters_per_hour"] / row[f"{other}_adapters_per_hour"], 2
            )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="small-llama", help="a preset or checkpoint (random ok)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size-tokens", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--layout", default="auto")
    p.add_argument("--remat", default="none", help="none, or block for large models")
    p.add_argument(
        "--adapters-per-pass",
        nargs="+",
        default=None,
        help="one-job variants: 'all' and/or training.adapters_per_pass values "
        "(default: all 1 on CPU, all on GPU/TPU)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per adapter")
    p.add_argument("--train-steps", type=int, default=STUDY_STEPS, help="for adapters/hour")
    p.add_argument("--peft", action="store_true", help="also time the PyTorch + PEFT loop")
    p.add_argument("--scan-layers", action="store_true", help="model.scan_layers: true")
    p.add_argument(
        "--no-single",
        action="store_true",
        help="time the one job only (no one-adapter-at-a-time jobs; not with --peft)",
    )
    args = p.parse_args()
    if args.no_single and args.peft:
        p.error("--peft trains the one-adapter jobs' cells: drop --no-single")
    on_cpu = jax.devices()[0].platform == "cpu"
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.adapters_per_pass = args.adapters_per_pass or (["all", "1"] if on_cpu else ["all"])

    ceiling = matmul_ceiling("float32" if on_cpu else "bfloat16")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for A in args.adapters:
            rows.append(measure(args, A, ceiling, Path(tmp)))
            print(rows[-1], flush=True)
    report(
        "sweep: one job vs one adapter at a time vs PyTorch + PEFT",
        {
            "model": args.model,
            "dtype": args.dtype,
            "rank": args.rank,
            "batch": args.batch,
            "scan_layers": args.scan_layers,
            "timed_steps": args.steps,
            "matmul_flops_per_s": f"{ceiling:.4g}",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
