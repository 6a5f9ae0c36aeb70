"""LoRA variants (LoRA+, PiSSA, OLoRA, DoRA) against PEFT, the library whose semantics they
take: the same base, data and steps trained by jaxlora and by PEFT + torch give the same losses
and the same adapters to rounding."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import jaxlora
from jaxlora.cells import JobData, plan_cells
from jaxlora.config import load_config
from jaxlora.sweep import SweepJob
from tests.runs import assert_equal_to_rounding, rounding_bound, write_config

STEPS = 10
LR, WD = 3.0e-3, 0.01


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny"
    jaxlora.load_pretrained("tiny-llama").save_hf(path)
    return path


def train_both(
    tmp_path: Path,
    base_dir: Path,
    lora: dict,
    peft_model: Callable,
    optimizer: Callable | None = None,
):
    """`STEPS` steps of one adapter (`lora.*` settings) in jaxlora, and of `peft_model(hf,
    initial_dir)` under `optimizer(peft_model)` (default torch AdamW) with the same batches.
    Returns (our losses, PEFT's losses, our exported adapter dir, the PEFT model, bound)."""
    from transformers import AutoModelForCausalLM

    cfg = write_config(
        tmp_path / "variant.yaml",
        **{
            "model.path": str(base_dir),
            "lora.dropout": 0.0,
            "lora.rank": 4,
            **{f"lora.{k}": v for k, v in lora.items()},
            "training.steps": STEPS,
            "training.lr": LR,
            "training.weight_decay": WD,
            "training.clip_norm": 1.0,
            "training.schedule": "constant",
            "training.warmup_ratio": 0.0,
            "data.size_tokens": 300,
        },
    )
    config = load_config(cfg)
    out = tmp_path / "run"
    job = SweepJob(config, out, progress=False, devices=jax.devices()[:1])
    (plan,) = job.plans
    initial = jaxlora.init_adapters(job.model, [plan.lora], [plan.init_seed])
    jaxlora.save_peft(job.model, initial, 0, tmp_path / "initial")
    job.run()
    ours = [json.loads(x)["loss"][plan.name] for x in (out / "metrics.jsonl").read_text().splitlines()]

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model = peft_model(hf, tmp_path / "initial")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        optimizer(model)
        if optimizer
        else torch.optim.AdamW(params, lr=LR, weight_decay=WD, betas=(0.9, 0.999), eps=1e-8)
    )
    data = JobData(plan_cells(config, job.model.config), job.model.tokenizer, 4)
    data.prepare([0])
    ref = []
    for step in range(STEPS):
        tokens, valid, loss = data.batch(data.plans[0], step)
        out_t = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
            labels=torch.tensor(np.where(loss, tokens, -100), dtype=torch.long),
        )
        out_t.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        ref.append(out_t.loss.item())
    return ours, ref, out / "adapters" / plan.name, model, rounding_bound(config)


def from_initial(hf, initial: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf, initial, is_trainable=True)


def test_lora_plus_matches_pefts_loraplus_optimizer(tmp_path, base_dir):
    """`lora.lr_ratio` against PEFT's `create_loraplus_optimizer` (B at lr x ratio)."""
    from peft.optimizers import create_loraplus_optimizer

    ratio = 16.0

    def loraplus(model):
        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=LR,
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=WD,
            betas=(0.9, 0.999),
            eps=1e-8,
        )

    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"lr_ratio": ratio}, from_initial, loraplus
    )
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    np.testing.assert_allclose(ours, ref, rtol=bound)
    model.save_pretrained(tmp_path / "peft_final")
    theirs = load_file(tmp_path / "peft_final" / "adapter_model.safetensors")
    mine = load_file(adapter_dir / "adapter_model.safetensors")
    assert_equal_to_rounding({"a": mine}, {"a": theirs}, bound)
