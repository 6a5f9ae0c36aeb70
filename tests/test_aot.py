"""`jaxlora plan --aot`: the tiny model's training step compiled for a TPU v5e slice by libtpu's
compile-only devices, its figures against plan's, and the program free of CPU code paths.

Needs the tpu-aot extra (libtpu); run apart from the main suite, which deselects the marker:
    pytest -m tpu_aot tests/test_aot.py
The error cases that need no libtpu run in the main suite (tests/test_plan.py has the plan's
arithmetic; the last tests here are unmarked)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from jaxlora import aot, aot_job
from jaxlora.cli import main as cli
from jaxlora.config import load_config
from jaxlora.plan import make_plan
from jaxlora.sharding import make_mesh

TOPOLOGY = "v5e:2x4"
# The study's recipe on the tiny model: bf16, all-linear rank-8 adapters with dropout, remat,
# batch 8 x 128; 8 adapters, one per chip. Unrolled (`auto` scans on a TPU): XLA counts a
# loop's body once, and the FLOPs tests compare every layer's.
SETS = [
    "model.dtype=bfloat16",
    "model.remat=block",
    "model.scan_layers=false",
    "lora.dropout=0.1",
    "data.max_length=128",
    "sweep.lora.rank=[8]",
    "sweep.data.size_tokens=[125, 250, 500, 1000, 2000, 4000, 8000, 16000]",
]
QUICKSTART = "configs/quickstart.yaml"


def _compiled_within_20_percent(p: aot.Program) -> aot.Compiled:
    """`p` compiled without error, and plan's estimate of it within the issue's +-20% of the
    compiler's total: the pinned libtpu's figure, the same on any host."""
    got = aot.compile_program(p)
    assert not got.error, got.error
    assert 0.8 <= p.estimated_bytes / got.total <= 1.2, p.estimated_bytes / got.total
    return got


def _sets(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def _config(*extra: str):
    return load_config(QUICKSTART, [*SETS, *extra])


@pytest.fixture(scope="module")
def report() -> aot.Report:
    return aot_job.compile_job(_config(), TOPOLOGY)


@pytest.mark.tpu_aot
def test_tiny_step_and_decoding_compile_for_v5e_and_fit(report):
    assert report.devices == 8 and report.device_kind == "TPU v5 lite"
    # fits are judged against what the compiler lets a program use, not the HBM as sold
    assert report.hbm_nominal == 16 * 2**30 and report.hbm_source == "the compiler"
    assert report.hbm_bytes == 15.75 * 2**30
    print(report.render())
    p, decoding = report.programs  # the step; the quickstart's eval: one group's decoding
    assert p.name.startswith("train_step") and decoding.name.startswith("eval_decode")
    assert report.fits and not decoding.error and decoding.total > 0
    assert p.arguments > 0 and p.temporaries > 0 and p.flops > 0
    # The training state is donated: the new state reuses its buffers.
    assert 0 < p.aliased <= p.outputs


@pytest.mark.tpu_aot
def test_plan_estimate_is_near_the_compiler(report):
    """Bytes: plan's estimate against what the compiler holds for data (arguments + outputs -
    aliased + temporaries; the program's code, ~14 MB here, is no estimate's business). Bound
    0.8-1.5x: on this 64-wide model the activations dominate, and the compiler pads them to
    TPU tiles (8 x 128) that plan does not model; the +-20% target of issue 26 is for the 1B
    and 8B shapes, where weights and optimizer state dominate. FLOPs: plan counts products
    (parameters, attention, remat's second forward), the compiler counts every operation
    (norms, softmax, rope, the dropout hash, AdamW), about a tenth more on a model this
    narrow, so 0.8 <= plan / compiler <= 1."""
    p = report.programs[0]
    assert not p.loops, "XLA counts a loop's body once: no FLOPs to compare"
    data = p.arguments + p.outputs - p.aliased + p.temporaries
    print(f"bytes plan {p.estimated_bytes:.4g} compiler {data:.4g}; FLOPs plan "
          f"{p.estimated_flops:.4g} compiler {p.flops:.4g}")  # fmt: skip
    assert 0.8 <= p.estimated_bytes / data <= 1.5, (p.estimated_bytes, data)
    assert 0.8 <= p.estimated_flops / p.flops <= 1.0, (p.estimated_flops, p.flops)


@pytest.mark.tpu_aot
def test_the_1b_step_is_planned_within_20_percent():
    """The study's capacity recipe (rank 8, dropout 0.1, batch 8 x 128, remat block) on the 1B
    shape, scanned, 24 adapter slots on v5e:2x4 (mesh 8/1/1): its 128K vocabulary on a
    2048-wide model makes the loss's logits the step's largest activation. The loss takes 8
    positions at a time, so plan counts a chunk's logits, not the batch's [T, V] (with those,
    plan said 1.62x), plus the head's table and a layer's kernels whole, the adapters' bf16
    copy and the scan's layer-major gradients: within the issue's 20% (measured 1.11x)."""
    config = load_config(
        "configs/phonebook_capacity_llama3_8b.yaml",
        [
            "model.path=llama-3.2-1b-shape",
            "model.scan_layers=true",
            "mesh.adapter=8",
            "mesh.fsdp=1",
            "sweep.lora.rank=[8]",
        ],
    )
    devices = aot.topology_devices(TOPOLOGY)
    usable, _ = aot.usable_hbm(devices[0])
    plan = make_plan(config, len(devices), usable / 2**30, 197, 0.4)
    step = aot.train_program(plan.config, make_mesh(8, 1, 1, devices), plan)
    _compiled_within_20_percent(step)


@pytest.mark.tpu_aot
def test_remat_recompute_in_plan_flops_matches_the_compiler():
    """What remat adds, compiler vs plan: the second forward of every block (products and, in
    the compiler's count only, the block's elementwise work): plan's share within 0.75-1x."""
    flops = {}
    for remat in ("none", "block"):
        config = _config(f"model.remat={remat}")
        plan = make_plan(config, 8, 16, 197, 0.4)
        mesh = make_mesh(-1, 1, 1, aot.topology_devices(TOPOLOGY))
        p = aot.compile_program(aot.train_program(plan.config, mesh, plan))
        assert not p.loops, "XLA counts a loop's body once: no FLOPs to compare"
        flops[remat] = (p.flops, p.estimated_flops)
    compiled = flops["block"][0] - flops["none"][0]
    planned = flops["block"][1] - flops["none"][1]
    print(f"remat adds: plan {planned:.4g}, compiler {compiled:.4g}")
    assert 0.75 <= planned / compiled <= 1.0, (planned, compiled)


@pytest.mark.tpu_aot
def test_tpu_program_takes_no_cpu_code_paths():
    """The step traced for TPU devices from this CPU host takes the TPU's paths: the CPU-only
    optimization barrier on each LoRA factor's gradient (models/layers.py, one operand) must
    be absent. The barriers a TPU program keeps are remat's, each on a block's several saved
    values. Needs the step to read its platform from its mesh (StepConfig.mesh)."""
    config = _config()
    devices = aot.topology_devices(TOPOLOGY)
    plan = make_plan(config, len(devices), 16, 197, 0.4)
    mesh = make_mesh(-1, 1, 1, devices)
    program = aot.train_program(plan.config, mesh, plan)
    text = program.fn.lower(*program.args).as_text()
    assert "stablehlo.optimization_barrier" in text, "remat's barriers missing: the step's HLO?"
    single = re.findall(r"stablehlo\.optimization_barrier %[\w#]+ : tensor<([^>]*)>", text)
    assert not single, f"barriers on {single}: a CPU path in a TPU program"


@pytest.mark.tpu_aot
def test_cli_json_is_the_last_line(capsys):
    assert cli(["plan", QUICKSTART, *_sets(SETS), "--aot", TOPOLOGY, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    got = json.loads(out[-1])
    assert set(got) == {"topology", "devices", "hbm_bytes", "fits", "programs"}
    assert (got["topology"], got["devices"], got["fits"]) == (TOPOLOGY, 8, True)
    p = got["programs"][0]
    assert set(p) >= {"name", "compiled_bytes", "estimated_bytes", "fits", "flops", "compile_s"}
    assert p["compiled_bytes"] > 0 and p["compile_s"] > 0
    assert any("temporaries" in line for line in out)


@pytest.mark.tpu_aot
def test_aot_neither_reads_nor_writes_the_compilation_cache(tmp_path):
    """`plan --aot` measures the compiler, so no program may come from jax's persistent cache
    (and libtpu's compile-only client cannot load one: each read printed a warning). jax
    decides once, at the first compile, whether it uses the cache: switched off later, it was
    used all the same. A fresh process (that decision is per process), with the cache on."""
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAXLORA_COMPILATION_CACHE"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlora.cli", "plan", QUICKSTART, *_sets(SETS), "--aot", TOPOLOGY],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (cache.exists() and any(cache.iterdir())), sorted(cache.iterdir())
    assert "compilation cache" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.tpu_aot
def test_a_step_that_does_not_fit_names_its_largest_buffers(capsys):
    """16 rank-8 adapters of the 8B shape on 2 x 4 chips at batch 128 x 128, 16x the study's:
    8 adapters per chip of 32 rows each, whose activations (remat's block inputs alone are
    32 layers x 32K tokens x 4096 x 2 bytes = 8 GiB) exceed a v5e's 16 GiB. (At batch 64 the
    compiler accepts 13.5 GiB of temporaries, and only the total with the arguments, 18.65 GiB,
    does not fit.) Scanned (the compiler refuses in ~20 s; unrolled would take minutes)."""
    sets = [
        *SETS,
        "model.path=llama-3.1-8b-shape",
        "model.scan_layers=true",
        f"sweep.data.size_tokens={[100 * (i + 1) for i in range(16)]}",
        "training.batch_size=128",
        "mesh.adapter=2",
        "mesh.fsdp=4",
        "eval=null",  # the step alone: a refusal compiles twice (the second for its buffers)
    ]
    code = cli(["plan", QUICKSTART, *_sets(sets), "--aot", TOPOLOGY])
    captured = capsys.readouterr()
    assert code == 2
    assert "does not fit" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "refused by the compiler" in captured.out and "largest buffers" in captured.out


@pytest.mark.tpu_aot
@pytest.mark.parametrize("generation", sorted(aot.USABLE_GIB))
def test_usable_hbm_is_read_from_the_compiler(generation):
    """The compiler's refusal of the probe states its usable HBM (e.g. "exceeds available HBM
    (15.75G)", two decimals): the reading, not the fallback table, and it agrees with the
    table to the message's rounding (0.005 GiB)."""
    shape = "2x2x1" if generation in ("v4", "v5p") else "2x4"
    (device, *_) = aot.topology_devices(f"{generation}:{shape}")
    usable, source = aot.usable_hbm(device)
    assert source == "the compiler"
    assert abs(usable / 2**30 - aot.USABLE_GIB[generation]) <= 0.005, usable / 2**30


def test_a_program_over_the_usable_hbm_does_not_fit():
    """15.80 GiB fits a v5e's 16 GiB as sold but not the 15.75 the compiler allows."""
    gib = 2**30
    program = aot.Compiled("p", 0.0, 0.0, 1.0, arguments=int(3 * gib), temporaries=int(12.8 * gib))
    report = aot.Report("v5e:2x4", 8, "TPU v5 lite", 15.75 * gib, None, [program], 16 * gib)
    assert not report.fits and not report.to_json()["programs"][0]["fits"]
    program.temporaries = int(12.7 * gib)
    assert report.fits


@pytest.mark.tpu_aot
def test_the_memorys_decoding_programs_compile_for_v5e(capsys):
    """configs/memory_quickstart.yaml's memory methods (tiny model): the base alone with and
    without a context (RAG: 400 + 256 tokens, cut to the 496 that the model's 512 positions
    leave before 16 new tokens, pad to 512; ICL: the same bound as a prefix all rows share,
    prefilled once, then 256 tokens of each question), a rank-16 adapter
    per row (top-1 routes and the linear/TIES merges), a rank-48 one (the 3-source `cat`
    merge), and each merge itself (32 questions' top 3 of the library merged in one call).
    Each is compiled and fits; plan's estimate is there for each."""
    code = cli(["plan", "configs/memory_quickstart.yaml", "--aot", TOPOLOGY, "--json"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and got["fits"]
    names = [p["name"] for p in got["programs"]]
    print("\n".join(names))
    memory = {
        n.split("[")[0] + " " + n.split(": ")[1].split(",")[0].rstrip("]")
        for n in names
        if n.startswith("memory")
    }
    assert memory == {
        "memory_base 32 x 512 + 16 tokens",
        "memory_base 32 x 256 + 16 tokens after a shared 512-token prefix",
        "memory_base 32 x 256 + 16 tokens",
        "memory_adapters 32 x 256 + 16 tokens",
        "memory_merge 32 rows x 3 rank-16 sources -> rank-16",  # linear, TIES
        "memory_merge 32 rows x 3 rank-16 sources -> rank-48",  # cat
    }, names
    assert any("rank-48" in n and "bm25@3/cat" in n for n in names)
    assert any("rank-16" in n and "bm25@3/ties" in n and "oracle" in n for n in names)
    for p in got["programs"]:
        assert p["compiled_bytes"] > 0 and p["estimated_bytes"] > 0 and p["fits"], p


@pytest.mark.tpu_aot
def test_quality_option_scoring_compiles_for_v5e(capsys):
    """configs/quality_memory_tiny.yaml scores QuALITY's 4 options by their log-likelihood
    under every method (memory.loglik): its programs are built beside the decoding ones, for
    the base, the top-1 adapters (the library) and the TIES merges (one rank-8 merge per
    question), at the widest prompt (the 256-token context, the question and a 128-token
    option, cut to the model's 512 positions), and each compiles, fits and has plan's
    estimate."""
    code = cli(["plan", "configs/quality_memory_tiny.yaml", "--aot", TOPOLOGY, "--json"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and got["fits"]
    options = [p for p in got["programs"] if p["name"].startswith("memory_options")]
    print("\n".join(p["name"] for p in options))
    kinds = {p["name"].split(", ")[-1].rstrip("]") for p in options}
    assert kinds == {"the base", "rank-8 adapter"}, kinds
    assert any("bm25@3/ties" in p["name"] and "bm25@3/ties+rag" in p["name"] for p in options)
    assert all(" x 512 tokens" in p["name"] for p in options if "+" in p["name"])
    for p in options:
        assert p["compiled_bytes"] > 0 and p["estimated_bytes"] > 0 and p["fits"], p


def _phonebook_8b_memory(method: str) -> tuple[list[aot.Program], float]:
    """The programs of configs/phonebook_memory_llama3_8b.yaml's memory with `method` alone
    (the 8B shape, scanned, mesh 1/8/1 on TOPOLOGY), and the bytes a chip lets a program use."""
    from jaxlora import aot_memory

    config = load_config(
        "configs/phonebook_memory_llama3_8b.yaml",
        ["model.path=llama-3.1-8b-shape", "model.scan_layers=true", f"memory.methods=[{method}]"],
    )
    devices = aot.topology_devices(TOPOLOGY)
    mesh = make_mesh(config.mesh.adapter, config.mesh.fsdp, config.mesh.tensor, devices)
    plan = make_plan(config, len(devices), 16, 197, 0.4)
    usable, _ = aot.usable_hbm(devices[0])
    return aot_memory.memory_programs(config, mesh, plan), usable


@pytest.mark.tpu_aot
def test_the_8b_memorys_cat_merge_keeps_the_library_split_and_fits_v5e():
    """configs/phonebook_memory_llama3_8b.yaml (16 rank-64 adapters on mesh 1/8/1): 16 questions'
    top 3 merged by `cat` into rank-192 adapters. Left to itself the compiler held the merged
    MLP factors of all 32 layers whole on every chip (37.4 GiB of temporaries, refused); kept
    split as the library is, the merge fits, and plan's estimate is within 20% of it."""
    programs, usable = _phonebook_8b_memory("bm25@3/cat")
    (merge,) = [p for p in programs if "merge" in p.name]
    assert "16 rows x 3 rank-64 sources -> rank-192" in merge.name
    got = _compiled_within_20_percent(merge)  # measured 0.83x
    assert got.total <= usable, got.total / 2**30


@pytest.mark.tpu_aot
def test_the_8b_memorys_long_icl_row_is_planned_within_20_percent():
    """configs/phonebook_memory_llama3_8b.yaml's `base+icl` on v5e:2x4 (mesh 1/8/1): one row of
    25,600 tokens, which cannot split over fsdp 8. The compiler keeps the weights split and
    all-gathers the row's activations instead; plan counts no gathered weights for it and the
    blocked attention's bf16 probabilities, and is within the issue's 20% of the compiler
    (measured 1.07x; counting gathered weights and float32 blocks, plan said 1.94x)."""
    (icl,), _ = _phonebook_8b_memory("base+icl")
    assert "1 x 25600" in icl.name
    _compiled_within_20_percent(icl)


@pytest.mark.tpu_aot
def test_the_8b_quality_option_scoring_is_planned_within_20_percent():
    """configs/quality_memory_llama3_8b.yaml's `embedding+rag` option scoring on v5p:2x2x1
    (mesh 4/1/1): 8 questions x 4 options, 2,048 tokens a row, a rank-16 adapter each. No KV
    cache and no token loop: plan counts the larger of a layer's working set (with the
    adapter's products) and the scored logits, and is within the issue's 20% of the compiler
    (measured 1.00x; with decoding's prefill and two float32 logits copies, plan said 1.73x)."""
    from jaxlora import aot_memory

    sets = ["model.path=llama-3.1-8b-shape", "model.scan_layers=true", "mesh.adapter=4"]
    config = load_config(
        "configs/quality_memory_llama3_8b.yaml", [*sets, "memory.methods=[embedding+rag]"]
    )
    # the plan of its training job with no documents to read (the articles are on the hub)
    planned = load_config(
        "configs/quality_memory_llama3_8b.yaml", [*sets, "data.units=none", "memory=null"]
    )
    devices = aot.topology_devices("v5p:2x2x1")
    plan = make_plan(planned, len(devices), 95, 459, 0.4)
    programs = aot_memory.memory_programs(config, make_mesh(4, 1, 1, devices), plan)
    (options,) = [p for p in programs if p.name.startswith("memory_options")]
    assert "8 questions x 4 options x 2048 tokens, rank-16 adapter" in options.name
    _compiled_within_20_percent(options)


@pytest.mark.tpu_aot
def test_grouped_serving_passes_compile_to_the_tpus_grouped_matmul():
    """What `Engine(grouped=None)` picks on a TPU, by the TPU compiler: a pass of 16 rows of the
    tiny model over 16 adapters, grouped over its U distinct adapters, compiles to the TPU's
    ragged-dot kernel (not a dense product per group), and with every row on one adapter (U =
    1) needs fewer temporaries than gathering each row's adapter. (That grouping costs more
    than the gather at U = B shows at scale, benchmarks/README.md: not on a 64-wide model.)"""
    from jaxlora import aot_serve
    from jaxlora.sharding import compiling_for

    programs = aot_serve.serving_programs(
        "tiny-llama", "v5e:2x2", adapters=16, rows=16, rank=8, width=32, new_tokens=16,
        active=(16, 1),
    )  # fmt: skip
    per_row, distinct, shared = (aot.compile_program(p) for p in programs)
    assert not (per_row.error or distinct.error or shared.error)
    assert 0 < shared.temporaries < per_row.temporaries
    assert shared.temporaries <= distinct.temporaries
    with compiling_for(programs[-1].mesh):
        hlo = programs[-1].fn.lower(*programs[-1].args).compile().as_text()
    assert "ragged_dot" in hlo


@pytest.mark.tpu_aot
def test_serving_and_memory_passes_trace_for_the_tpu(monkeypatch):
    """Every platform decision taken while tracing the serving engine's passes and the memory's
    programs for TPU devices from this CPU host reads "tpu". Inside a jitted pass a nested
    decode (`decode_stack` in `_routed_decode`) sees no mesh on its traced prompts, so each
    takes the mesh as a static argument; one that did not would trace for the host's CPU."""
    from jaxlora import aot_memory, aot_serve, sharding
    from jaxlora.models import attention, layers
    from jaxlora.sharding import compiling_for

    seen: list[str] = []

    def probe() -> str:
        seen.append(sharding.target_platform())
        return seen[-1]

    monkeypatch.setattr(attention, "target_platform", probe)
    monkeypatch.setattr(layers, "target_platform", probe)
    # shapes no other test traces, so that no cached trace skips the probe
    programs = aot_serve.serving_programs(
        "tiny-llama", "v5e:2x2", adapters=4, rows=4, rank=4, width=24, new_tokens=8, active=(2,)
    )
    config = load_config("configs/memory_quickstart.yaml", ["memory.max_new_tokens=10"])
    devices = aot.topology_devices(TOPOLOGY)
    mesh = make_mesh(-1, 1, 1, devices)
    plan = make_plan(config, len(devices), 16, 197, 0.4)
    programs += aot_memory.memory_programs(config, mesh, plan)
    for p in programs:
        count = len(seen)
        with compiling_for(p.mesh):
            p.fn.lower(*p.args)
        if p.name.startswith("memory_merge"):  # arithmetic on the factors: no model, no choice
            continue
        assert len(seen) > count, f"{p.name}: no platform decision traced (a cached trace?)"
    assert set(seen) == {"tpu"}, sorted(set(seen))


@pytest.mark.tpu_aot
def test_distillation_compiles_with_its_teacher():
    """configs/distill_tiny.yaml (NTP and distilling groups, tiny model). `distill.teacher:
    step`: the teacher runs inside the step, which takes each adapter's context. `cache`: the
    step reads the teacher's float32 logits [A, B, T, V] instead (more arguments), and the
    teacher compiles as its own program."""
    got = {}
    for mode in ("step", "cache"):
        config = load_config(
            "configs/distill_tiny.yaml", [f"distill.teacher={mode}", "memory=null"]
        )
        got[mode] = aot_job.compile_job(config, TOPOLOGY)
        print(got[mode].render())
    step, cache = got["step"], got["cache"]
    assert [p.name.split("[")[0] for p in step.programs] == ["train_step"]
    assert [p.name.split("[")[0] for p in cache.programs] == ["train_step", "teacher"]
    assert step.fits and cache.fits
    assert cache.programs[0].arguments > step.programs[0].arguments
    # the teacher returns its logits (and hidden states) for the host cache
    assert cache.programs[1].outputs > 0 and cache.programs[1].estimated_bytes > 0


def _one_line_error(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_topology_is_one_line_listing_the_names(capsys):
    line = _one_line_error(capsys, ["plan", QUICKSTART, "--aot", "v9x:2x4"])
    assert "v9x:2x4" in line and all(n in line for n in ("v4", "v5e", "v5p", "v6e"))


def test_without_libtpu_aot_names_the_extra(capsys, monkeypatch):
    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    line = _one_line_error(capsys, ["plan", QUICKSTART, "--aot", TOPOLOGY])
    assert 'pip install -e ".[tpu-aot]"' in line


def test_aot_refuses_a_memory_override(capsys):
    argv = ["plan", QUICKSTART, "--aot", TOPOLOGY, "--device-memory", "3"]
    assert "--aot" in _one_line_error(capsys, argv)


def test_json_needs_aot(capsys):
    assert "--aot" in _one_line_error(capsys, ["plan", QUICKSTART, "--devices", "1", "--json"])
