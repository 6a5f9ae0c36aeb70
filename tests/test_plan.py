"""`jaxlora plan`: sizes against PEFT and hand arithmetic; the verdict and its exit code."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import jaxlora
from jaxlora.cells import plan_cells
from jaxlora.cli import main as cli
from jaxlora.config import load_config
from jaxlora.plan import (
    AUTO_FIT,
    AUTO_PAD_FLOPS,
    AUTO_PAD_MEMORY,
    GIB,
    activation_bytes,
    attention_flops_per_token,
    choose_layout,
    flops_per_token,
    make_plan,
    recompute_flops_per_token,
)
from tests.test_checkpoints import REAL_CONFIGS

LLAMA8B = jaxlora.ModelConfig.from_hf(REAL_CONFIGS["Llama-3.1-8B"])


@pytest.mark.parametrize(
    ("ours", "peft"),
    [
        (dict(rank=8), dict(r=8, target_modules="all-linear")),
        (dict(rank=64), dict(r=64, target_modules="all-linear")),
        (
            dict(rank=16, targets="attention"),
            dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        ),
        (
            dict(rank=4, targets=("up_proj",), layers=(0, 5)),
            dict(r=4, target_modules=["up_proj"], layers_to_transform=[0, 5]),
        ),
    ],
)
def test_adapter_size_equals_peft_trainable_parameters(tmp_path, ours, peft):
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS["Llama-3.1-8B"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    trainable, _ = get_peft_model(model, PeftLoraConfig(**peft)).get_nb_trainable_parameters()
    assert jaxlora.LoRAConfig(**ours).num_params(LLAMA8B) == trainable


def test_flops_per_token_by_hand():
    c = LLAMA8B
    D, F, L, V = c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size
    kv = c.num_kv_heads * c.head_dim
    per_layer = 2 * D * D + 2 * D * kv + 3 * D * F + 2 * D  # q,o + k,v + MLP + two norms
    non_embedding = L * per_layer + D
    assert flops_per_token(c, 0) == 4 * (non_embedding + V * D)
    assert flops_per_token(c, 1000) == 4 * (non_embedding + V * D) + 6000


def test_plan_flops_add_remat_recompute_and_attention_by_hand():
    """remat: block runs every block's forward twice (2 x the blocks' and the adapters'
    parameters per token more; embedding and lm_head once), attention's products cost
    4 x T x N x H per layer forward, 8 x backward, 4 x again under remat. The compiler's own
    count is checked against these in tests/test_aot.py."""
    c = LLAMA8B
    D, F, L, T = c.hidden_size, c.intermediate_size, c.num_layers, 128
    NH, KH = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    blocks = L * (2 * D * NH + 2 * D * KH + 3 * D * F + 2 * D)
    lora = jaxlora.LoRAConfig(rank=8).num_params(c)
    assert recompute_flops_per_token(c, 0, "none") == 0
    assert recompute_flops_per_token(c, lora, "block") == 2 * blocks + 2 * lora
    assert attention_flops_per_token(c, T, "none") == 12 * T * NH * L
    assert attention_flops_per_token(c, T, "block") == 16 * T * NH * L
    plans = {
        remat: make_plan(
            load_config(
                "configs/phonebook_capacity_llama3_8b.yaml",
                [
                    "model.path=llama-3.1-8b-shape",
                    f"model.remat={remat}",
                    "sweep.lora.rank=[8]",
                    "mesh.fsdp=1",  # one device (the config splits over 8)
                ],
            ),
            1,
            80,
            989,
            0.4,
        )
        for remat in ("none", "block")
    }
    tokens = plans["none"].tokens_per_step
    extra = (2 * blocks + 2 * lora + 4 * T * NH * L) * tokens
    # a difference of two ~1e15 float totals: approx's relative 1e-6 admits its rounding
    assert plans["block"].flops_per_step - plans["none"].flops_per_step == pytest.approx(extra)


def _grid(tmp_path, **sets):
    """The capacity grid planned for GPUs: the config splits the base over 8 chips (fsdp 8, for
    a v5e-8); these plans keep it whole per device (fsdp 1) unless a test sets it."""
    config = load_config(
        "configs/phonebook_capacity_llama3_8b.yaml",
        [
            "model.path=llama-3.1-8b-shape",
            "mesh.fsdp=1",
            *(f"{k}={v}" for k, v in sets.items()),
        ],
    )
    return config


def test_base_weights_are_the_model_size_split_over_fsdp(tmp_path):
    params = 8_030_261_248  # Llama-3.1-8B
    one = make_plan(_grid(tmp_path, **{"mesh.adapter": 1, "mesh.fsdp": 1}), 1, 80, 989, 0.4)
    assert dict(one.rows)["base weights"] == params * 2
    sharded = make_plan(_grid(tmp_path, **{"mesh.adapter": 1, "mesh.fsdp": 8}), 8, 80, 989, 0.4)
    # norm vectors stay whole on every device (not split over fsdp): a few 1e-5 of the model
    # above an even split; 1e-3 admits that, a weight left unsharded would be 8x
    assert dict(sharded.rows)["base weights"] == pytest.approx(params * 2 / 8, rel=1e-3)


def test_study_grid_on_eight_h100s_does_not_fit_and_says_so(capsys):
    code = cli(
        [
            "plan",
            "configs/phonebook_capacity_llama3_8b.yaml",
            "--devices",
            "8",
            "--set",
            "model.path=llama-3.1-8b-shape",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2
    assert "does NOT fit" in out and "200 adapters" in out
    assert err.startswith("jaxlora: error:") and "\n" not in err.strip() and "GiB per device" in err


def test_a_small_job_fits(capsys):
    code = cli(
        [
            "plan",
            "configs/phonebook_capacity_llama3_8b.yaml",
            "--devices",
            "8",
            "--set",
            "model.path=llama-3.1-8b-shape",
            "--set",
            "sweep.lora.rank=[4, 8]",
            "--set",
            "sweep.data.size_tokens=[1000, 2000, 4000, 8000]",
            "--set",
            "mesh.fsdp=1",  # a copy of the base per H100
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0 and "(fits)" in out
    total = float(out.split("total")[1].split("GiB")[0])
    assert 15 < total < 74.5  # more than the bf16 base alone, within an H100


def test_the_loss_is_planned_a_chunk_of_positions_at_a_time():
    """The training loss never holds a batch's [T, V] logits (`objectives.loss_chunk`): an 8B
    batch of 8 x 128 over 128,256 logits takes 8 positions at a time, so plan counts a chunk's
    float32 logits and their gradient, 2 x 8 rows x 8 x V x 4 bytes. Doubling the vocabulary
    halves the chunk and adds nothing (whole logits would add 1 GiB)."""
    import dataclasses

    from jaxlora.objectives import loss_chunk

    V = LLAMA8B.vocab_size
    assert loss_chunk(8, 128, V) == 8 and loss_chunk(8, 128, 2 * V) == 4
    wide = dataclasses.replace(LLAMA8B, vocab_size=2 * V)
    one = activation_bytes(LLAMA8B, 1024, 128, 2, "block", 8, batch=8)
    assert activation_bytes(wide, 1024, 128, 2, "block", 8, batch=8) == one
    # with no logits at all (a vocabulary of one chunk's 8 positions' worth), the difference is
    # the chunk's pair
    narrow = dataclasses.replace(LLAMA8B, vocab_size=8)
    chunk = activation_bytes(narrow, 1024, 128, 2, "block", 8, batch=8)
    assert one - chunk == 2 * 8 * 8 * V * 4 - 2 * 8 * loss_chunk(8, 128, 8) * 8 * 4


def test_lora_dropout_is_planned_as_the_masks_random_words():
    """Dropout draws a uint32 per element of each LoRA input (the TPU compiler's step holds
    `u32[adapters, 1024, 8192]` for the 1B's 1,024 tokens): plan counts the widest input's, the
    down projection's F, two at once, for the one block being recomputed."""
    plain = activation_bytes(LLAMA8B, 1024, 128, 2, "block", 8, batch=8)
    dropped = activation_bytes(LLAMA8B, 1024, 128, 2, "block", 8, batch=8, dropout=True)
    assert dropped - plain == 1024 * 14336 * 4 * 2


def test_plan_memory_grows_with_adapters():
    small = make_plan(_grid(None, **{"sweep.lora.rank": "[8]"}), 8, 80, 989, 0.4)
    large = make_plan(_grid(None, **{"sweep.lora.rank": "[8, 64]"}), 8, 80, 989, 0.4)
    assert large.total > small.total
    assert large.adapters == 2 * small.adapters
    assert large.total / GIB < small.total / GIB + 80


def test_distilling_adapters_hold_the_teachers_outputs():
    """Per distilling adapter on a device: the teacher's float32 logits and the L1 term's hidden
    states at every position of its batch, B x T x (V + states x D) x 4 bytes."""
    shape = "model.path=llama-3.2-1b-shape"
    config = load_config("configs/distill_tiny.yaml", [shape])
    plan = make_plan(config, 1, 80, 989, 0.4)
    rows = dict(plan.rows)
    V, D, L = 128256, 2048, 16  # Llama-3.2-1B; release_a distils all L + 1 hidden states
    B, T = config.training.batch_size, config.data.max_length
    # One adapter per paper (6) for each objective (ntp, distill): 6 distil, all on one device.
    assert plan.adapters == 12
    assert rows["teacher outputs (float32)"] == 6 * B * T * (V + (L + 1) * D) * 4
    ntp = load_config(
        "configs/distill_tiny.yaml", [shape, "sweep.training.objective=[ntp]", "distill=null"]
    )
    assert "teacher outputs (float32)" not in dict(make_plan(ntp, 1, 80, 989, 0.4).rows)


# --------------------------------------------------------------------------- training.layout: auto


def _padding_cost(c, ranks: list[int], per_rank: int) -> float:
    """By hand: the FLOPs that padding every rank to the largest adds to one stack of all of
    them, as a fraction of the stack's FLOPs with each adapter at its own rank. All-linear LoRA
    parameters are linear in the rank (their count is checked against PEFT above)."""
    unit = jaxlora.LoRAConfig(rank=1).num_params(c)
    own = sum(per_rank * r * unit for r in ranks)
    padded = per_rank * len(ranks) * max(ranks) * unit
    base = per_rank * len(ranks) * flops_per_token(c, 0)
    return 6 * (padded - own) / (base + 6 * own)


def _layout(config, devices: int, memory_gib: float) -> tuple[int, ...]:
    c = jaxlora.models.model.model_config(config.model.path)
    sizes = {"adapter": devices, "fsdp": 1, "tensor": 1}
    return choose_layout(config, c, plan_cells(config, c), sizes, memory_gib * GIB)[0]


def test_auto_pads_the_small_ranks_of_a_big_model_into_one_stack():
    """Ranks 2..20 (2 adapters each) on the 8B shape: padding to 20 adds ~0.5% FLOPs, so one
    stack (one compiled program instead of ten); its 9.7 GiB of padded adapter state (float32
    weights, gradients and moments, the bf16 copy and the scan's layer-major gradients) is
    under a tenth of a 100 GiB device."""
    ranks = list(range(2, 21, 2))
    config = _grid(None, **{"sweep.lora.rank": ranks, "sweep.data.size_tokens": "[1000, 2000]"})
    assert _padding_cost(LLAMA8B, ranks, 2) < AUTO_PAD_FLOPS
    assert _layout(config, 1, 100) == (20,)
    plan = make_plan(config, 1, 100, 989, 0.4)
    assert plan.groups == 1 and plan.total <= AUTO_FIT * 100 * GIB
    assert "training.layout=auto: ranks padded to [20]" in plan.render()


def test_auto_keeps_ranks_apart_where_padding_costs_flops():
    """On tiny-llama (64 wide) a rank-8 LoRA is a large share of the model: padding rank 2 to
    8 would cost > 5%, so each rank keeps its group."""
    tiny = jaxlora.PRESETS["tiny-llama"].config
    config = load_config("configs/quickstart.yaml", ["sweep.lora.rank=[2, 8]"])
    assert _padding_cost(tiny, [2, 8], 4) > AUTO_PAD_FLOPS
    assert _layout(config, 1, 80) == (2, 8)


def test_auto_pads_only_within_a_tenth_of_the_device_memory():
    """The same job on a 64 GiB device: padding everything to 20 would take 9.7 GiB more
    (> 6.4), so only some ranks share a stack; on a 44 GiB device the job (40.4 GiB as rank
    groups) has no room under 90% for any padding."""
    ranks = list(range(2, 21, 2))
    config = _grid(None, **{"sweep.lora.rank": ranks, "sweep.data.size_tokens": "[1000, 2000]"})
    groups = make_plan(config.with_value("training.layout", "groups"), 1, 64, 989, 0.4)
    shared = _layout(config, 1, 64)
    assert 1 < len(shared) < len(ranks)
    plan = make_plan(config.with_value("training.layout", list(shared)), 1, 64, 989, 0.4)
    assert plan.total - groups.total <= AUTO_PAD_MEMORY * 64 * GIB
    assert plan.total <= AUTO_FIT * 64 * GIB
    assert _layout(config, 1, 44) == tuple(ranks)


def test_plan_counts_one_adapter_per_unit():
    """configs/paperqa_memory_tiny.yaml trains one adapter per paper of its generated corpus
    (6 papers); the config itself has one cell."""
    config = load_config("configs/paperqa_memory_tiny.yaml")
    assert len(config.cells()) == 1
    plan = make_plan(config, 1, 80, 989, 0.4)
    assert plan.adapters == 6
    assert "data.units: 6 units, one adapter each" in plan.render()


def test_plan_says_when_it_cannot_cut_units(tmp_path):
    """A model directory without tokenizer files: the plan counts cells and says so."""
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS["Llama-3.1-8B"]))
    config = load_config("configs/paperqa_memory_tiny.yaml", [f"model.path={tmp_path}"])
    plan = make_plan(config, 1, 80, 989, 0.4)
    assert plan.adapters == 1
    assert "data.units: not cut (no local tokenizer at model.path)" in plan.render()


def test_auto_model_settings_scan_on_accelerators_and_remat_only_where_needed():
    """`model.scan_layers: auto` scans on GPUs and TPUs and not on CPUs; `model.remat: auto`
    recomputes blocks only where the job without it would pass 90% of a device: the capacity
    grid's rank-8 subset (20 adapters, 8B, batch 8 x 128) needs ~47 GiB a device without remat,
    so it keeps its activations on an 80 GiB GPU and recomputes them on a 16 GiB chip."""
    from jaxlora.plan import resolve_model

    sets = {"model.remat": "auto", "model.scan_layers": "auto", "sweep.lora.rank": "[8]"}
    config = _grid(None, **sets)
    c = jaxlora.models.model.model_config(config.model.path)
    plans = plan_cells(config, c)
    sizes = {"adapter": 8, "fsdp": 1, "tensor": 1}
    on_gpu, why = resolve_model(config, c, plans, sizes, 80 * GIB, "gpu")
    assert on_gpu.model.scan_layers is True and on_gpu.model.remat == "none"
    assert why[0] == "model.scan_layers=auto: true on gpu"
    assert why[1].startswith("model.remat=auto: none (")
    small, why = resolve_model(config, c, plans, sizes, 16 * GIB, "tpu")
    assert small.model.scan_layers is True and small.model.remat == "block"
    assert why[1].startswith("model.remat=auto: block (")
    on_cpu, _ = resolve_model(config, c, plans, sizes, 80 * GIB, "cpu")
    assert on_cpu.model.scan_layers is False
    # set values are kept as they are, and nothing is said of them
    fixed = config.with_value("model.remat", "block").with_value("model.scan_layers", False)
    assert resolve_model(fixed, c, plans, sizes, 80 * GIB, "gpu") == (fixed, [])
    # `jaxlora plan` resolves them for its device and says so
    plan = make_plan(config, 8, 16, 197, 0.4, platform="tpu")
    assert plan.config.model.remat == "block" and plan.config.model.scan_layers is True
    assert "model.remat=auto: block" in plan.render()


def test_a_cpu_job_resolves_its_auto_model_settings_to_the_fast_cpu_path():
    """The quickstart on this CPU: unrolled layers and no remat (its 16 tiny adapters fit many
    times over), as the resolved config a run records."""
    from jaxlora.job import Job

    job = Job(load_config("configs/quickstart.yaml"))
    assert job.config.model.scan_layers is False and job.config.model.remat == "none"
    assert "remat: none" in job.config.to_yaml() and "scan_layers: false" in job.config.to_yaml()


def test_the_memory_table_aligns_its_figures_whatever_the_labels():
    """A scanned bf16 job has the longest labels ("scan's layer-major gradients (float32)"):
    every row of each table still puts its GiB in one column."""
    plan = make_plan(_grid(None, **{"sweep.lora.rank": "[8]"}), 8, 80, 989, 0.4)
    text = plan.render()
    table = text.split("per-device memory:\n")[1].split("step time estimate:")[0].splitlines()
    assert any("scan's layer-major gradients" in line for line in table)
    assert len({line.index(" GiB") for line in table}) == 1, table
