"""The one-job sweep trainer against the references that define it: single-adapter runs,
single-device runs, uninterrupted runs, and the study's PEFT + torch recipe."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import jaxlora
from jaxlora.cells import JobData, plan_cells
from jaxlora.cli import main as cli
from jaxlora.config import load_config, parse_config
from jaxlora.models.model import stack_forward
from jaxlora.sweep import SweepJob
from tests.runs import (
    BASE,
    GRID,
    adapters,
    assert_equal_to_rounding,
    assert_identical,
    free_port,
    rounding_bound,
    run,
    train_refuses,
    write_config,
)

LAUNCH = Path(__file__).resolve().parents[1] / "launch"

# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    config = load_config(write_config(tmp / "grid.yaml", sweep=GRID))
    run(config, tmp / "run")
    return config, tmp / "run"


@pytest.mark.slow
def test_batched_equals_one_adapter_at_a_time(grid_run, tmp_path):
    """8 adapters (ranks 2/8, sizes 150/300 tokens, lrs 1e-3/3e-3, dropout 0.1) trained in one job
    equal each cell trained alone from a one-cell config (sweep removed, its values set), to
    rounding: XLA compiles a stack of 4 and a stack of 1 to different kernels."""
    config, run_dir = grid_run
    grid = adapters(run_dir)
    assert len(grid) == 8
    base_file = write_config(tmp_path / "one.yaml")
    for cell in config.cells():
        sets = [f"{k}={v}" for k, v in cell.values]
        alone = load_config(base_file, sets)
        out = tmp_path / cell.name
        run(alone, out)
        (single,) = adapters(out).values()
        bound = rounding_bound(alone)
        assert_equal_to_rounding({cell.name: single}, {cell.name: grid[cell.name]}, bound)
        assert max(np.abs(v).max() for k, v in single.items() if "lora_B" in k) > 1e-3


@pytest.mark.slow
def test_padded_layout_equals_rank_groups(grid_run, tmp_path):
    config, run_dir = grid_run
    padded = tmp_path / "padded"
    run(config.with_value("training.layout", "padded"), padded)
    # Zero-padded ranks change the shapes of the products, so their rounding.
    assert_equal_to_rounding(adapters(padded), adapters(run_dir), rounding_bound(config))


@pytest.mark.slow
def test_sequential_passes_equal_all_at_once(grid_run, tmp_path):
    """adapters_per_pass=1 on a 2-device adapter axis: each device takes its 2 adapters of a
    rank group in 2 passes (lax.map over a sharded stack), giving the same adapters."""
    config, run_dir = grid_run
    passes = tmp_path / "passes"
    config = config.with_value("training.adapters_per_pass", 1).with_value("mesh.adapter", 2)
    job = SweepJob(config, passes, progress=False, devices=jax.devices()[:2])
    assert job._step_config().passes == (2, 2)
    job.run()
    assert_equal_to_rounding(adapters(passes), adapters(run_dir), rounding_bound(config))


def sharded_config(config):
    """The grid on adapter 4 x fsdp 2, in one padded stack (half the compile of rank groups;
    padded == groups is tested on its own)."""
    return (
        config.with_value("mesh.adapter", 4)
        .with_value("mesh.fsdp", 2)
        .with_value("training.layout", "padded")
    )


@pytest.fixture(scope="module")
def sharded_run(grid_run, tmp_path_factory):
    config, _ = grid_run
    out = tmp_path_factory.mktemp("sharded") / "run"
    run(sharded_config(config), out, devices=jax.devices()[:8])
    return out


@pytest.mark.slow
def test_sharded_over_eight_devices_equals_one_device(grid_run, sharded_run):
    """fsdp splits the base weights' reductions over two devices, so the adapters agree to
    float32 rounding, not to the bit (the bound and its derivation: tests/runs.py)."""
    config, run_dir = grid_run
    assert_equal_to_rounding(adapters(sharded_run), adapters(run_dir), rounding_bound(config))


def test_outputs_of_a_run(grid_run):
    config, run_dir = grid_run
    with open(run_dir / "train_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [c.name for c in config.cells()]
    for row, cell in zip(rows, config.cells(), strict=True):
        for key, value in cell.values:
            assert float(row[key]) == float(value)
        assert int(row["rank"]) == cell.config.lora.rank
        assert int(row["trainable_params"]) == jaxlora.LoRAConfig(
            rank=cell.config.lora.rank
        ).num_params(jaxlora.PRESETS["tiny-llama"].config)
        assert (
            int(row["steps"]) == 6
            and row["status"] == "ok"
            and np.isfinite(float(row["final_loss"]))
        )
        assert int(row["n_rows"]) > 0
    sizes = {int(r["size_tokens"]): int(r["n_rows"]) for r in rows}
    assert sizes[300] > sizes[150]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(1, 7))
    assert set(lines[-1]["loss"]) == {c.name for c in config.cells()}
    # The run records what its `auto` settings chose, so a resume and an evaluation rebuild its
    # stacks: ranks 2 and 8 of tiny-llama keep their own groups (tests/test_plan.py), and on a
    # CPU the layers run unrolled, without remat (a few MB of activations)
    assert config.training.layout == config.model.remat == config.model.scan_layers == "auto"
    chosen = (
        config.with_value("training.layout", [2, 8])
        .with_value("model.remat", "none")
        .with_value("model.scan_layers", False)
    )
    assert load_config(run_dir / "config.yaml") == chosen


@pytest.mark.parametrize("devices", [1, 8])
def test_auto_settings_are_logged_and_valid(grid_run, tmp_path, caplog, devices):
    config, _ = grid_run
    config = config.with_value("mesh.adapter", devices)
    with caplog.at_level("INFO", logger="jaxlora"):
        job = SweepJob(config, tmp_path / "run", progress=False, devices=jax.devices()[:devices])
    assert "training.layout=auto: one group per rank" in caplog.text
    assert "model.scan_layers=auto: false on cpu" in caplog.text
    assert "model.remat=auto: none (" in caplog.text
    assert job.config.training.layout == (2, 8)
    ranks = [{job.plans[i].lora.rank for i in g.slots if i is not None} for g in job.groups]
    assert ranks == [{2}, {8}] and all(len(g.slots) % devices == 0 for g in job.groups)
    # adapters_per_pass: auto on a CPU: the most adapters whose batches stay within 1024 token
    # positions, at least one; every pass of a group takes an equal share of each device's.
    positions = (
        job.data.packed_length if job.packed else config.training.batch_size * job.data.width
    )
    per_pass = max(1, 1024 // positions)
    assert job.per_pass == per_pass
    assert f"training.adapters_per_pass=auto: {per_pass} per pass on cpu" in caplog.text
    for g in job.groups:
        local = len(g.slots) // devices
        assert local % job._passes(g) == 0 and local // job._passes(g) <= per_pass


def test_resume_keeps_the_layout_the_run_chose(grid_run, monkeypatch):
    """--resume with the original config (layout auto) takes the run's recorded buckets and
    never chooses again: another choice would not match the checkpoint's stacks."""
    config, run_dir = grid_run

    def chosen_again(*_):
        raise AssertionError("choose_layout called on resume")

    monkeypatch.setattr("jaxlora.job.choose_layout", chosen_again)
    monkeypatch.setattr("jaxlora.job.resolve_model", chosen_again)
    job = SweepJob(config, run_dir, resume=True, progress=False, devices=jax.devices()[:1])
    assert job.config.training.layout == (2, 8) and len(job.groups) == 2
    assert job.config.model.remat == "none" and job.config.model.scan_layers is False


def test_resume_keeps_the_model_settings_the_run_chose(grid_run, tmp_path):
    """A run recorded `model.remat: block` and scanned layers (as a run on a GPU that was short
    of memory would): resumed here with the original `auto` config, it keeps them, though this
    CPU would choose neither."""
    config, run_dir = grid_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    recorded = load_config(copy / "config.yaml")
    recorded = recorded.with_value("model.remat", "block").with_value("model.scan_layers", True)
    (copy / "config.yaml").write_text(recorded.to_yaml())
    job = SweepJob(config, copy, resume=True, progress=False, devices=jax.devices()[:1])
    assert job.config.model.remat == "block" and job.config.model.scan_layers is True


def test_a_rank_above_the_layouts_ceilings_is_refused(tmp_path):
    raw = {**BASE, "training": {**BASE["training"], "layout": [2]}}
    err = train_refuses(tmp_path, raw)
    assert "rank 4 is above the largest rank ceiling of training.layout [2]" in err


def test_existing_run_dir_is_not_overwritten(grid_run, capsys):
    _, run_dir = grid_run
    before = (run_dir / "train_summary.csv").read_text()
    assert cli(["train", str(run_dir / "config.yaml"), "--out", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "\n" not in err.strip()
    assert (run_dir / "train_summary.csv").read_text() == before


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lora.rnak=4", "did you mean lora.rank"),
        ("training.lr=fast", "training.lr"),
        ("lora.rank=0", "lora.rank"),
    ],
)
def test_config_errors_are_one_line(tmp_path, capsys, override, needle):
    cfg = write_config(tmp_path / "c.yaml")
    assert cli(["train", str(cfg), "--out", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("jaxlora: error:")
    assert not (tmp_path / "run").exists()


def test_block_remat_gives_the_same_gradients_and_really_rematerialises():
    from jaxlora import lora
    from jaxlora.objectives import token_mean_ce

    model = jaxlora.load_pretrained("tiny-llama")
    stack = lora.init_adapters(model, [lora.LoRAConfig(rank=4)] * 2, [1, 2])
    weights = jax.tree.map(lambda x: x + 0.01, stack.weights)
    ids = np.random.default_rng(0).integers(10, 500, (2, 3, 16))
    mask = np.ones_like(ids, bool)

    def loss(w, remat):
        logits = stack_forward(
            model.graph(stack.placement, remat=remat), model.params, w, stack.consts, ids, mask
        )
        return jax.vmap(token_mean_ce)(logits, ids, mask).sum()

    grads = {r: jax.jit(jax.grad(loss), static_argnums=1)(weights, r) for r in ("none", "block")}
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["block"]), strict=True):
        # remat recomputes the same ops in the same order: equal up to XLA's fusion choices
        np.testing.assert_allclose(a, b, atol=1e-7)
    jaxpr = {r: str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(weights, r)) for r in grads}
    assert jaxpr["none"].count("remat") == 0
    assert jaxpr["block"].count("remat") == model.config.num_layers


# ---------------------------------------------------------------------------------------------
# processes


@pytest.mark.slow
def test_local_multi_process_launch_equals_one_process(grid_run, sharded_run, tmp_path):
    """launch/local_cpu.sh: two processes of 4 CPU devices each give, bit for bit, the adapters
    of one process with 8 devices on the same mesh: every device runs the same program."""
    config, _ = grid_run
    cfg = tmp_path / "mp.yaml"
    cfg.write_text(sharded_config(config).to_yaml())
    out = tmp_path / "mp"
    env = {
        **os.environ,
        "JAXLORA_CMD": f"{sys.executable} -m jaxlora.cli",
        "JAXLORA_CPU_DEVICES": "4",
        "JAXLORA_PORT": str(free_port()),
    }
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local_cpu.sh"), "2", cfg, out, "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_identical(adapters(out), adapters(sharded_run))


def test_local_launch_passes_on_a_config_error(tmp_path):
    env = {**os.environ, "JAXLORA_CMD": f"{sys.executable} -m jaxlora.cli"}
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local_cpu.sh"), "2", tmp_path / "missing.yaml", tmp_path / "o"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "missing.yaml does not exist" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_local_launch_stops_the_others_when_one_process_fails(tmp_path):
    """Process 1 fails at once while process 0 would wait forever (as for a lost peer): the
    launch ends promptly with process 1's status."""
    fake = tmp_path / "fake.sh"
    fake.write_text('[ "$JAXLORA_PROCESS_ID" = 1 ] && exit 3\nexec sleep 300\n')
    env = {**os.environ, "JAXLORA_CMD": f"bash {fake}"}
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local_cpu.sh"), "2", "c.yaml", tmp_path / "o"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert time.monotonic() - t0 < 60


def test_local_launch_passes_sigterm_to_every_process(tmp_path):
    """SIGTERM to the launcher reaches each process (which would checkpoint and exit 0); the
    launch waits for them and exits 0."""
    fake = tmp_path / "fake.sh"
    fake.write_text(
        f"trap 'touch {tmp_path}/term$JAXLORA_PROCESS_ID; sleep 1; exit 0' TERM\n"
        f"touch {tmp_path}/ready$JAXLORA_PROCESS_ID\n"
        "while true; do sleep 0.1; done\n"
    )
    env = {**os.environ, "JAXLORA_CMD": f"bash {fake}"}
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "local_cpu.sh"), "2", "c.yaml", tmp_path / "o"], env=env
    )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert all((tmp_path / f"term{i}").exists() for i in range(2))


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(grid_run, tmp_path, capsys):
    _, run_dir = grid_run
    saved = run_dir / "config.yaml"
    assert (
        cli(
            [
                "train",
                str(saved),
                "--out",
                str(run_dir),
                "--resume",
                "--set",
                "training.lr=0.5",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "training.lr" in capsys.readouterr().err
    assert cli(["train", str(saved), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the study's recipe


@pytest.mark.slow
def test_one_adapter_follows_the_peft_torch_recipe(tmp_path):
    """20 steps of jaxlora vs PEFT + torch AdamW(wd 0.01) + HF cosine schedule + clip 1.0, same
    base, same initial A, same batches, dropout 0."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    base_dir = tmp_path / "base"
    jaxlora.load_pretrained("tiny-llama").save_hf(base_dir)
    cfg = write_config(
        tmp_path / "recipe.yaml",
        **{
            "model.path": str(base_dir),
            "lora.dropout": 0.0,
            "lora.rank": 8,
            "training.steps": 20,
            "training.lr": 3.0e-3,
            "training.weight_decay": 0.01,
            "training.clip_norm": 1.0,
            "training.warmup_ratio": 0.1,
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
    ours_losses = [
        json.loads(x)["loss"][plan.name] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    )
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "initial", is_trainable=True)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=20)
    data = JobData(plan_cells(config, job.model.config), job.model.tokenizer, 4)
    data.prepare([0])
    ref_losses = []
    for step in range(20):
        tokens, valid, loss = data.batch(data.plans[0], step)
        labels = np.where(loss, tokens, -100)
        out_t = peft_model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
        )
        out_t.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ref_losses.append(out_t.loss.item())
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    bound = rounding_bound(config)
    np.testing.assert_allclose(ours_losses, ref_losses, rtol=bound)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it learned something
    peft_model.save_pretrained(tmp_path / "torch_final")
    ref = load_file(tmp_path / "torch_final" / "adapter_model.safetensors")
    ours = load_file(out / "adapters" / plan.name / "adapter_model.safetensors")
    assert_equal_to_rounding({"torch": ours}, {"torch": ref}, bound)


def test_plan_cells_seeds_depend_only_on_the_cell():
    raw = json.loads(json.dumps(BASE))
    grid = parse_config({**raw, "sweep": {"lora.rank": [2, 8], "training.lr": [1.0e-3, 2.0e-3]}})
    model_config = jaxlora.PRESETS["tiny-llama"].config
    plans = plan_cells(grid, model_config)
    by_values = {tuple(p.cell.values): p for p in plans}
    # same lora settings -> same init; same data -> same order, whatever the lr
    assert (
        by_values[(("lora.rank", 2), ("training.lr", 1e-3))].init_seed
        == by_values[(("lora.rank", 2), ("training.lr", 2e-3))].init_seed
    )
    assert len({p.data_seed for p in plans}) == 1
    assert len({p.init_seed for p in plans}) == 2
    alone = plan_cells(parse_config({**raw, "lora": {**raw["lora"], "rank": 8}}), model_config)[0]
    assert alone.init_seed == by_values[(("lora.rank", 8), ("training.lr", 1e-3))].init_seed


class _Compiles(logging.Handler):
    """Counts XLA compilations of the train step (what `jax_log_compiles` reports)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "XLA compilation of jit(train_step)" in record.getMessage():
            self.count += 1


def test_train_step_compiles_once(tmp_path):
    """The state the step returns is placed like the state it was given: a second or third step
    reuses the first compilation (on a 2-device mesh, where the adapter axis is really split)."""
    raw = {
        **BASE,
        "training": {**BASE["training"], "batch_size": 3},
        "mesh": {"adapter": 2},
        "sweep": {"data.seed": [0, 1]},
    }
    config = parse_config(raw)
    job = SweepJob(config, tmp_path / "run", progress=False, devices=jax.devices()[:2])
    state, step_fn = job.init_state(), job.step_function()
    counter = _Compiles()
    logger = logging.getLogger("jax._src.dispatch")
    logger.addHandler(counter)
    try:
        with jax.log_compiles():
            for step in range(3):
                state, losses = step_fn(job.model.params, state, job.batches(step)[0])
            jax.block_until_ready(losses)
    finally:
        logger.removeHandler(counter)
    assert counter.count == 1
