"""LoRA variants (LoRA+, PiSSA, OLoRA, DoRA) against PEFT, the library whose semantics they
take: the same base, data and steps trained by jaxlora and by PEFT + torch give the same losses
and the same adapters to rounding."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
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


def loraplus(ratio: float) -> Callable:
    """PEFT's LoRA+ optimizer (torch AdamW, B's group at lr x `ratio`) for `train_both`."""

    def make(model):
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=LR,
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=WD,
            betas=(0.9, 0.999),
            eps=1e-8,
        )

    return make


def from_initial(hf, initial: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf, initial, is_trainable=True)


def test_lora_plus_matches_pefts_loraplus_optimizer(tmp_path, base_dir):
    """`lora.lr_ratio` against PEFT's `create_loraplus_optimizer` (B at lr x ratio)."""
    ratio = 16.0
    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"lr_ratio": ratio}, from_initial, loraplus(ratio)
    )
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    np.testing.assert_allclose(ours, ref, rtol=bound)
    model.save_pretrained(tmp_path / "peft_final")
    theirs = load_file(tmp_path / "peft_final" / "adapter_model.safetensors")
    mine = load_file(adapter_dir / "adapter_model.safetensors")
    assert_equal_to_rounding({"a": mine}, {"a": theirs}, bound)


@pytest.mark.parametrize(("init", "dora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_pissa_and_olora_train_and_export_as_peft_does(tmp_path, base_dir, init, dora):
    """PEFT's `init_lora_weights="pissa"/"olora"` (it rewrites the base to the residual) against
    jaxlora's (each adapter carries its frozen correction, the base is shared): the initial
    B @ A per module, the losses of training, and the export, which PEFT loads on the original
    base and which equals PEFT's own conversion (`path_initial_model_for_weight_conversion`).
    With DoRA too: PEFT's conversion keeps A and B and drops the magnitudes, jaxlora's keeps
    them, and only it gives the trained model's logits on the original base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def residual_model(hf, _initial):
        config = LoraConfig(
            r=4,
            lora_alpha=4,
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights=init,
            use_dora=dora,
        )
        model = get_peft_model(hf, config)
        model.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the start
        model.save_pretrained(tmp_path / "peft_initial")
        model.peft_config["default"].init_lora_weights = init
        return model

    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"init": init, "use_dora": dora}, residual_model
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
    factors = {k: v.shape for k, v in mine.items() if "magnitude" not in k}
    assert factors == {k: v.shape for k, v in theirs.items()}
    assert len(mine) - len(factors) == (len(factors) // 2 if dora else 0)
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


def dora_adapter(path: Path, out_dir: Path, seed: int = 0, **kw):
    """A PEFT DoRA adapter with random non-zero A, B and magnitudes away from ||W + s B A||
    (PEFT starts them there, where DoRA equals LoRA), saved to out_dir."""
    from peft import LoraConfig, get_peft_model

    from tests.hf_factory import load_hf_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, **kw)
    model = get_peft_model(load_hf_model(path), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    model.eval()
    model.save_pretrained(out_dir)
    return model


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        ("llama", dict(target_modules="all-linear")),
        # Qwen2's q/k/v carry a bias, which DoRA's column scaling must leave out.
        ("qwen2", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1])),
    ],
)
def test_a_peft_dora_adapter_gives_pefts_logits(hf_checkpoint, tmp_path, family, kw):
    from tests.test_lora import peft_logits
    from tests.test_model_parity import padded_batch

    path = hf_checkpoint(family)
    peft_model = dora_adapter(path, tmp_path / "dora", **kw)
    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, [tmp_path / "dora"])
    ids, mask = padded_batch("right")
    ours = np.asarray(model(ids[None], attention_mask=mask[None], adapters=stack))[0]
    ref = peft_logits(peft_model, ids, mask)
    valid = mask.astype(bool)
    # float32 forward, torch's reduction order vs XLA's: logits of size ~1-10 through 2 layers
    # of <= 128-term sums agree to ~1e-6; DoRA read as plain LoRA misses by > 1e-2 (below).
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4
    # The same factors with DoRA switched off (`lora_dora` 0): plain LoRA, far from PEFT's.
    consts = nnx.map_state(
        lambda p, v: v.replace(v.get_value() * 0) if p[-1] == "lora_dora" else v, stack.consts
    )
    as_lora = dataclasses.replace(stack, consts=consts)
    lora_only = np.asarray(model(ids[None], attention_mask=mask[None], adapters=as_lora))[0]
    assert np.abs(lora_only[valid] - ref[valid]).max() > 1e-2

    # Written back, PEFT's tensors and config come out unchanged.
    jaxlora.save_peft(model, stack, 0, tmp_path / "again")
    before = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    after = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_dora"]


@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_dora_trains_as_peft_does(tmp_path, base_dir, ratio):
    """`lora.use_dora` from jaxlora's start (magnitudes ||W||, exported and loaded by PEFT):
    the losses, B A and the magnitudes after training equal PEFT's; with LoRA+ the magnitudes
    (1-D) train at B's rate, as PEFT's create_loraplus_optimizer groups them."""
    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"use_dora": True, "lr_ratio": ratio}, from_initial, loraplus(ratio)
    )
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    np.testing.assert_allclose(ours, ref, rtol=bound)
    model.save_pretrained(tmp_path / "peft_final")
    theirs = load_file(tmp_path / "peft_final" / "adapter_model.safetensors")
    mine = load_file(adapter_dir / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    assert_equal_to_rounding({"a": mine}, {"a": theirs}, bound)
    start = load_file(tmp_path / "initial" / "adapter_model.safetensors")
    for key in (k for k in mine if k.endswith("lora_magnitude_vector")):
        moved = np.linalg.norm(theirs[key] - start[key])
        assert moved > 0  # the magnitudes trained
        # Their training moves by `moved`; the reduction order changes that by `bound` of it.
        assert np.linalg.norm(mine[key] - theirs[key]) <= bound * moved, key


def test_variants_sweep_as_one_job_equal_to_each_alone(tmp_path):
    """`sweep: {lora.use_dora: [false, true], lora.init: [default, pissa]}` (dropout 0.1, LoRA+
    ratio 4) trains as one job, and each adapter equals its cell trained alone to rounding: in a
    stack, plain adapters hold zero corrections and switched-off magnitudes."""
    from tests.runs import adapters, run

    sweep = {"lora.use_dora": [False, True], "lora.init": ["default", "pissa"]}
    sets = {"lora.lr_ratio": 4.0, "training.lr": 3.0e-3}
    config = load_config(write_config(tmp_path / "grid.yaml", sweep=sweep, **sets))
    assert len(config.cells()) == 4
    run(config, tmp_path / "grid")
    grid = adapters(tmp_path / "grid")
    base_file = write_config(tmp_path / "one.yaml", **sets)
    for cell in config.cells():
        alone = load_config(base_file, [f"{k}={v}" for k, v in cell.values])
        run(alone, tmp_path / cell.name)
        (single,) = adapters(tmp_path / cell.name).values()
        # XLA compiles a stack of 4 and a stack of 1 to different kernels (runs.py).
        bound = rounding_bound(alone)
        assert single.keys() == grid[cell.name].keys()
        assert_equal_to_rounding({cell.name: single}, {cell.name: grid[cell.name]}, bound)
        for key in (k for k in single if "magnitude" in k):
            gap = np.linalg.norm(single[key] - grid[cell.name][key])
            assert gap <= bound * np.linalg.norm(single[key]), key


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_merged_dora_adapters_match_peft_add_weighted_adapter(
    hf_checkpoint, tmp_path, combination_type
):
    """Two DoRA adapters merged by `jaxlora.memory.merge` and by PEFT's add_weighted_adapter
    (A and B merged, the first source's use_dora, fresh magnitudes ||W||) give the same
    logits; a PiSSA source with its residual correction is refused with one line."""
    from peft import PeftModel

    from jaxlora.memory.merging import MergeError, merge
    from tests.hf_factory import load_hf_model
    from tests.test_lora import peft_logits
    from tests.test_model_parity import padded_batch

    path = hf_checkpoint("llama")
    for seed in (0, 1):
        dora_adapter(path, tmp_path / f"d{seed}", seed=seed, target_modules="all-linear")
        # As trained adapters are saved: PEFT creates the merged adapter with its first
        # source's init, and only from B = 0 (the default init) are its magnitudes ||W||; from
        # init_lora_weights=False they would come from torch's global RNG.
        config = tmp_path / f"d{seed}" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "init_lora_weights": True}))
    peft_model = PeftModel.from_pretrained(load_hf_model(path), tmp_path / "d0")
    peft_model.load_adapter(tmp_path / "d1", adapter_name="d1")
    peft_model.add_weighted_adapter(["default", "d1"], [0.7, 0.5], "m", combination_type)
    peft_model.set_adapter("m")
    ids, mask = padded_batch("right")
    ref = peft_logits(peft_model, ids, mask)

    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, [tmp_path / "d0", tmp_path / "d1"])
    merged = merge(model, stack, [[0, 1]], [[0.7, 0.5]], combination_type)
    assert merged.configs[0].use_dora
    ours = np.asarray(model(ids[None], attention_mask=mask[None], adapters=merged))[0]
    base = np.asarray(model(ids, mask))
    valid = mask.astype(bool)
    # float32 forwards in torch and XLA (different sum orders): logits of size ~5 agree to
    # ~2e-5; a merge that kept the sources' magnitudes or dropped DoRA moves them by > 1e-2.
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4
    assert np.abs(ref[valid] - base[valid]).max() > 1e-2

    pissa = jaxlora.init_adapters(model, [jaxlora.LoRAConfig(rank=2, init="pissa")], [0])
    with pytest.raises(MergeError, match="merge its PEFT export instead") as e:
        merge(model, pissa, [[0]], [[1.0]], "linear")
    assert "\n" not in str(e.value)


def test_variant_settings_at_their_defaults_keep_the_seeds_of_before():
    """An adapter's seeds hash its `lora:` section. The variant keys came later: at their
    defaults they stay out of the hash, so a config that does not use them trains exactly the
    adapters it trained before they existed (the hash of the seven original fields)."""
    from jaxlora.cells import stable_seed
    from jaxlora.models.model import model_config

    config = load_config("configs/quickstart.yaml")
    plans = plan_cells(config, model_config(config.model.path))
    original = ("rank", "alpha", "targets", "layers", "dropout", "use_rslora", "init")
    for plan in plans:
        lora = plan.cell.config.lora
        before = {k: getattr(lora, k) for k in original}
        seed = plan.cell.config.training.seed
        assert plan.init_seed == stable_seed(seed, "init", before)
    dora = load_config("configs/quickstart.yaml", ["lora.use_dora=true"])
    assert plan_cells(dora, model_config(dora.model.path))[0].init_seed != plans[0].init_seed


def test_plan_counts_doras_magnitudes_and_the_residual_corrections():
    """`jaxlora plan`'s adapter rows: DoRA adds a float32 magnitude per output of every adapted
    module (weights; moments and gradients follow them), PiSSA/OLoRA a frozen A0, B0 as large
    as the adapter's A, B."""
    from jaxlora.lora import module_dims
    from jaxlora.models.model import model_config
    from jaxlora.plan import make_plan

    def rows(**sets):
        config = load_config("configs/quickstart.yaml", [f"{k}={v}" for k, v in sets.items()])
        return dict(make_plan(config, 1, 80, 989, 0.4).rows), config

    plain, config = rows()
    dora, _ = rows(**{"lora.use_dora": "true"})
    pissa, _ = rows(**{"lora.init": "pissa"})
    c = model_config(config.model.path)
    outs = sum(module_dims(c, m)[1] for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    outs += sum(module_dims(c, m)[1] for m in ("gate_proj", "up_proj", "down_proj"))
    magnitudes = 4 * len(config.cells()) * c.num_layers * outs
    key = "adapter weights (float32)"
    assert dora[key] - plain[key] == magnitudes
    assert "residual corrections (float32)" not in plain
    assert pissa["residual corrections (float32)"] == plain[key]
