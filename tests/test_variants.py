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
    ours = [
        json.loads(x)["loss"][plan.name] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]

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


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_train_and_export_as_peft_does(tmp_path, base_dir, init):
    """PEFT's `init_lora_weights="pissa"/"olora"` (it rewrites the base to the residual) against
    jaxlora's (each adapter carries its frozen correction, the base is shared): the initial
    B @ A per module, the losses of training, and the export, which PEFT loads on the original
    base and which equals PEFT's own conversion (`path_initial_model_for_weight_conversion`)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def residual_model(hf, _initial):
        config = LoraConfig(
            r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=init
        )
        model = get_peft_model(hf, config)
        model.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the start
        model.save_pretrained(tmp_path / "peft_initial")
        model.peft_config["default"].init_lora_weights = init
        return model

    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"init": init}, residual_model
    )
    # The starts: B A of every module, PEFT's (float32 SVD/QR) against ours (float64, then
    # float32). Both are exact factorisations; the tiny model's weights are N(0, 0.02), so
    # entries of B A are below 0.1 and float32 rounding moves them by ~1e-8. The wrong
    # factorisation (olora for pissa) misses by 0.05.
    start_ours = load_file(tmp_path / "initial" / "adapter_model.safetensors")
    start_peft = load_file(tmp_path / "peft_initial" / "adapter_model.safetensors")
    for name, a in start_peft.items():
        if name.endswith("lora_A.weight"):
            b = start_peft[name.replace("lora_A", "lora_B")]
            a2 = start_ours[name][:4]  # the trained half of the converted start (= the start)
            b2 = start_ours[name.replace("lora_A", "lora_B")][:, :4]
            np.testing.assert_allclose(b2 @ a2, b @ a, atol=1e-5, err_msg=name)
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    np.testing.assert_allclose(ours, ref, rtol=bound)
    model.save_pretrained(
        tmp_path / "peft_final", path_initial_model_for_weight_conversion=tmp_path / "peft_initial"
    )
    theirs = load_file(tmp_path / "peft_final" / "adapter_model.safetensors")
    mine = load_file(adapter_dir / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert_equal_to_rounding({"a": mine}, {"a": theirs}, bound)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 8

    # PEFT loads jaxlora's export on the unmodified base and computes what PEFT's trained
    # residual model computes.
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    )
    loaded = PeftModel.from_pretrained(hf, adapter_dir).eval()
    model.eval()
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    # The trained adapters differ by `bound` of their delta; logits of unit scale move by less.
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=bound)
