"""Run configuration: parsing, one-line errors, overrides, the sweep grid and its invariants."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from jaxlora.config import (
    SECTIONS,
    CheckpointSection,
    Config,
    EvalSection,
    LoRASection,
    TrainingSection,
    apply_overrides,
    config_keys,
    load_config,
    parse_config,
)
from jaxlora.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# The example of the issue, verbatim.
ISSUE_EXAMPLE = """\
model: {path: /path/to/hf_dir, dtype: float32}
lora: {rank: 8, alpha: null, targets: all-linear, dropout: 0.1}
data:
  dataset: phonebook
  path: null
  size_tokens: 1000
  chat_template: true
  loss_mask: full
  max_length: 128
training: {steps: 1500, batch_size: 8, lr: 5.0e-5, schedule: cosine, warmup_ratio: 0.0,
           weight_decay: 0.01, clip_norm: 1.0, seed: 42}
mesh: {adapter: -1, fsdp: 1, tensor: 1}
checkpoint: {every_steps: 500, keep: 2}
sweep:
  lora.rank: [2, 4, 8, 16]
  data.size_tokens: [1000, 2000, 4000]
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def parse(text: str) -> Config:
    return parse_config(yaml.safe_load(textwrap.dedent(text)), "run.yaml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return one_line(info.value)


def one_line(e: BaseException) -> str:
    message = str(e)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- parsing


def test_issue_example_yields_the_grid(tmp_path):
    config = load_config(write(tmp_path, ISSUE_EXAMPLE))
    assert config.model.path == "/path/to/hf_dir"
    assert config.training.lr == 5e-5 and config.training.clip_norm == 1.0
    assert config.eval is None
    assert config.sweep == (("lora.rank", (2, 4, 8, 16)), ("data.size_tokens", (1000, 2000, 4000)))

    cells = config.cells()
    assert len(cells) == 12
    # First key varies slowest.
    assert [c.values for c in cells[:4]] == [
        (("lora.rank", 2), ("data.size_tokens", 1000)),
        (("lora.rank", 2), ("data.size_tokens", 2000)),
        (("lora.rank", 2), ("data.size_tokens", 4000)),
        (("lora.rank", 4), ("data.size_tokens", 1000)),
    ]
    assert cells[0].name == "rank2-size_tokens1000"
    assert cells[-1].name == "rank16-size_tokens4000"
    assert len({c.name for c in cells}) == 12
    for cell in cells:
        values = dict(cell.values)
        assert cell.config.lora.rank == values["lora.rank"]
        assert cell.config.data.size_tokens == values["data.size_tokens"]
        assert cell.config.sweep == ()
        assert cell.config.model == config.model and cell.config.training == config.training


def test_defaults(tmp_path):
    assert load_config(write(tmp_path, "model: {}\n")) == Config()
    config = parse("{}")
    assert config.model.path == "tiny-llama" and config.lora.rank == 8
    assert config.data.size_tokens == 1000 and config.data.size_rows is None
    assert config.checkpoint.async_ is True and config.eval is None
    cells = config.cells()
    assert [(c.name, c.values) for c in cells] == [("adapter", ())]
    assert cells[0].config == config


def test_types_are_coerced():
    config = parse("""
        lora: {rank: 4, alpha: 16, targets: [v, q_proj], layers: [3, 1, 1]}
        training: {lr: 5e-5, adam_eps: 1E-8, weight_decay: 0, clip_norm: null}
        checkpoint: {async: false}
        eval: {}
    """)
    # `5e-5` (no dot) is a string to PyYAML; int for float is fine; lists become tuples.
    assert config.training.lr == 5e-5 and isinstance(config.training.lr, float)
    assert config.training.adam_eps == 1e-8
    assert config.training.weight_decay == 0.0 and isinstance(config.training.weight_decay, float)
    assert config.training.clip_norm is None
    assert config.lora.alpha == 16.0 and isinstance(config.lora.alpha, float)
    assert config.lora.targets == ("q_proj", "v_proj")  # canonical names in model order
    assert config.lora.layers == (1, 3)
    assert config.checkpoint == CheckpointSection(async_=False)
    assert config.eval == EvalSection()
    assert parse("lora: {targets: attention}").lora.targets == "attention"
    assert parse("lora: {targets: q}").lora.targets == "q_proj"


def test_sections_validate_on_direct_construction():
    with pytest.raises(ConfigError, match=r"rank: must be > 0"):
        LoRASection(rank=0)
    with pytest.raises(ConfigError, match=r"lr: expected a number"):
        TrainingSection(lr="fast")
    section = LoRASection(rank=2)
    with pytest.raises(ConfigError, match=r"dropout: must be in \[0, 1\)"):
        dataclasses.replace(section, dropout=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        section.rank = 4  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Unknown keys, with the closest valid one.
        ("lora: {rnk: 4}", "run.yaml: unknown key lora.rnk (did you mean lora.rank?)"),
        ("training: {step: 3}", "unknown key training.step (did you mean training.steps?)"),
        ("lroa: {rank: 4}", "run.yaml: unknown section lroa (did you mean lora?)"),
        ("rank: 4", "unknown section rank (did you mean lora.rank?)"),
        (
            "checkpoint: {async_: true}",
            "unknown key checkpoint.async_ (did you mean checkpoint.async?)",
        ),
        # Wrong types: ints are not bools, not floats, not strings.
        ("lora: {rank: true}", "run.yaml: lora.rank: expected an int; got true"),
        ("lora: {rank: 4.0}", "lora.rank: expected an int; got 4.0"),
        ("training: {steps: '1500'}", "training.steps: expected an int; got '1500'"),
        ("training: {lr: fast}", "training.lr: expected a number; got 'fast'"),
        ("training: {lr: .inf}", "training.lr: must be a finite number"),
        ("lora: {use_rslora: 1}", "lora.use_rslora: expected true or false; got 1"),
        ("data: {chat_template: 'yes please'}", "data.chat_template: expected true or false"),
        ("lora: {alpha: [1]}", "lora.alpha: expected a number or null; got [1]"),
        ("lora: {targets: 3}", "lora.targets: expected a string or a list of strings; got 3"),
        ("lora: {layers: [0, x]}", "lora.layers[1]: expected an int; got 'x'"),
        ("lora: [1, 2]", "run.yaml: lora: expected a mapping of keys"),
        # Choices, with the closest valid one.
        (
            "training: {schedule: cosin}",
            "training.schedule: expected one of cosine, linear, constant; got 'cosin' (did you mean cosine?)",
        ),
        ("model: {dtype: bf16}", "model.dtype: expected one of float32, bfloat16, float16"),
        (
            "lora: {targets: all_linear}",
            "lora.targets: unknown LoRA target 'all_linear' (did you mean all-linear?)",
        ),
        (
            "lora: {targets: [q_proj, vproj]}",
            "lora.targets[1]: unknown module 'vproj' (did you mean v_proj?)",
        ),
        # Impossible values.
        ("lora: {rank: 0}", "lora.rank: must be > 0, got 0"),
        ("lora: {alpha: -1}", "lora.alpha: must be > 0, got -1.0"),
        ("lora: {dropout: 1}", "lora.dropout: must be in [0, 1), got 1.0"),
        ("lora: {layers: [0, -1]}", "lora.layers[1]: must be >= 0, got -1"),
        ("lora: {layers: []}", "lora.layers: empty list"),
        ("lora: {targets: []}", "lora.targets: empty list"),
        ("training: {weight_decay: -0.1}", "training.weight_decay: must be >= 0"),
        ("training: {adam_b2: 1.0}", "training.adam_b2: must be in [0, 1)"),
        ("training: {warmup_ratio: 1}", "training.warmup_ratio: must be in [0, 1)"),
        ("model: {path: ''}", "model.path: must not be empty"),
        ("mesh: {fsdp: 0}", "mesh.fsdp: must be > 0, or -1 for all remaining devices; got 0"),
        ("mesh: {adapter: -1, tensor: -1}", "mesh.tensor: at most one mesh axis may be -1"),
        ("eval: {max_new_tokens: 0}", "eval.max_new_tokens: must be > 0"),
        # Cross-field rules.
        (
            "data: {size_tokens: 1000, size_rows: 10}",
            "data.size_rows: give either size_tokens (1000) or size_rows (10), not both",
        ),
        ("data: {dataset: counterfact}", "data.path: dataset counterfact needs a path"),
    ],
)
def test_errors_are_one_line_and_name_the_key(text, expected):
    assert expected in error_of(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "sweep: {lora.rnk: [2]}",
            "run.yaml: sweep key lora.rnk is not a config key (did you mean lora.rank?)",
        ),
        ("sweep: {rank: [2]}", "sweep key rank is not a config key (did you mean lora.rank?)"),
        ("sweep: {lora: {rank: [2]}}", "sweep keys are dotted paths: write lora.KEY"),
        (
            "sweep: {lora.rank: []}",
            "run.yaml: sweep.lora.rank: empty list; give at least one value",
        ),
        ("sweep: {lora.rank: 4}", "sweep.lora.rank: expected a list of values, got 4"),
        ("sweep: {lora.rank: [2, 4, x]}", "run.yaml: sweep.lora.rank[2]: expected an int; got 'x'"),
        ("sweep: {lora.rank: [2, 4, 0]}", "sweep.lora.rank[2]: must be > 0, got 0"),
        ("sweep: {lora.rank: [2, 4, 2]}", "sweep.lora.rank[2]: duplicate value 2"),
        (
            "sweep: {lora.targets: [all-linear, [q, zz]]}",
            "sweep.lora.targets[1][1]: unknown module 'zz'",
        ),
        (
            "sweep: {training.steps: [10, 20]}",
            "sweep key training.steps cannot be swept: all adapters of a job share one step loop",
        ),
        ("sweep: {training.batch_size: [1]}", "share one step loop"),
        ("sweep: {training.schedule: [cosine]}", "share one step loop"),
        ("sweep: {training.layout: [padded]}", "cannot be swept"),
        (
            "sweep: {model.path: [a, b]}",
            "sweep key model.path cannot be swept: all adapters of a job share one base model",
        ),
        ("sweep: {mesh.fsdp: [1, 2]}", "share one device mesh"),
        ("sweep: {checkpoint.keep: [1]}", "checkpointed together"),
        ("sweep: {eval.max_new_tokens: [1]}", "evaluated together"),
        ("sweep: [lora.rank]", "run.yaml: sweep: expected a mapping"),
        # A budget by tokens and by rows at once.
        (
            "data: {size_rows: 10}\nsweep: {data.size_tokens: [1000]}",
            "sweep.data.size_tokens: data.size_rows is also set",
        ),
        (
            "data: {size_tokens: 500}\nsweep: {data.size_rows: [10]}",
            "sweep.data.size_rows: data.size_tokens is also set (500)",
        ),
        # A cell that is impossible even though every value is valid on its own.
        (
            "sweep: {data.dataset: [phonebook, qa]}",
            "run.yaml: sweep cell datasetqa: data.path: dataset qa needs a path",
        ),
    ],
)
def test_sweep_errors(text, expected):
    assert expected in error_of(text)


def test_every_key_is_covered_by_the_sweepable_split():
    sweepable = set(config_keys(sweepable=True))
    fixed = set(config_keys(sweepable=False))
    assert sweepable | fixed == set(config_keys()) and not sweepable & fixed
    expected = {f"lora.{k}" for k in LoRASection.yaml_fields()}
    # One corpus per job: how it is cut into units is shared (data.unit is the unit axis).
    corpus = ["units", "unit_count", "unit_tokens", "unit_overlap", "document_field", "unit_keys"]
    expected |= {f"data.{k}" for k in SECTIONS["data"].yaml_fields() if k not in corpus}
    per_adapter = "lr warmup_ratio weight_decay clip_norm adam_b1 adam_b2 adam_eps seed objective"
    expected |= {f"training.{k}" for k in per_adapter.split()}
    # The objective's numbers are per group of adapters; the preset and the teacher's mode not.
    job_wide = ["preset", "teacher", "cache_gb"]
    expected |= {f"distill.{k}" for k in SECTIONS["distill"].yaml_fields() if k not in job_wide}
    assert sweepable == expected


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path, "lora:\n  rank: 4\n   alpha: 8\n", "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert one_line(info.value).startswith(f"{bad}: invalid YAML at line 3")
    # PyYAML would silently keep the last of two equal keys.
    dup = write(tmp_path, "lora: {rank: 4}\nlora: {rank: 8}\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML at line 2.*duplicate key lora"):
        load_config(dup)
    # An empty file (or one of comments only) is a mistake, not a request for the default grid.
    for text in ("", "# nothing yet\n", "{}\n"):
        empty = write(tmp_path, text, "empty.yaml")
        with pytest.raises(ConfigError, match=r"empty\.yaml: the config is empty; start from"):
            load_config(empty)
    top = write(tmp_path, "- lora\n", "top.yaml")
    with pytest.raises(ConfigError, match=r"top\.yaml: expected a mapping of sections"):
        load_config(top)


# --------------------------------------------------------------------------- budget


def test_a_row_budget_replaces_the_default_token_budget():
    config = parse("data: {size_rows: 100}")
    assert (config.data.size_tokens, config.data.size_rows) == (None, 100)
    grid = parse("sweep: {data.size_rows: [10, 20]}")
    assert [c.config.data.size_rows for c in grid.cells()] == [10, 20]
    assert all(c.config.data.size_tokens is None for c in grid.cells())
    # Both null: the whole dataset.
    whole = parse("data: {size_tokens: null}")
    assert (whole.data.size_tokens, whole.data.size_rows) == (None, None)


# --------------------------------------------------------------------------- overrides


def test_overrides(tmp_path):
    path = write(tmp_path, ISSUE_EXAMPLE)
    config = load_config(
        path,
        [
            "training.lr=1e-4",
            "lora.targets=[q_proj,v_proj]",
            "lora.alpha=null",
            "eval={}",
            "eval.max_new_tokens=20",
            "data.path=",  # empty value is YAML null
            "sweep.data.size_tokens=[500]",
        ],
    )
    assert config.training.lr == 1e-4
    assert config.lora.targets == ("q_proj", "v_proj")
    assert config.lora.alpha is None
    assert config.eval == EvalSection(max_new_tokens=20)
    assert config.data.path is None
    assert [c.name for c in config.cells()] == [f"rank{r}-size_tokens500" for r in (2, 4, 8, 16)]

    # A sweep axis can be added, and removed with null; then the plain key may be set.
    config = load_config(path, ["sweep.lora.rank=null", "lora.rank=32", "sweep.training.lr=[1e-4]"])
    assert config.sweep == (("data.size_tokens", (1000, 2000, 4000)), ("training.lr", (1e-4,)))
    assert config.lora.rank == 32
    assert load_config(path, ["eval=null"]).eval is None
    assert load_config(path, ["sweep={}"]).cells()[0].name == "adapter"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.lr", "--set training.lr: expected KEY=VALUE"),
        ("=3", "--set =3: expected KEY=VALUE"),
        ("lora.rnk=4", "--set lora.rnk=4: unknown key lora.rnk (did you mean lora.rank?)"),
        ("lr=1e-4", "--set lr=1e-4: unknown key lr (did you mean training.lr?)"),
        ("lora.rank.x=4", "--set lora.rank.x=4: unknown key lora.rank.x"),
        ("training.lr=fast", "--set training.lr=fast: training.lr: expected a number; got 'fast'"),
        ("lora.rank=0", "--set lora.rank=0: lora.rank: must be > 0"),
        ("lora.targets=[q_proj", "--set lora.targets=[q_proj: invalid YAML"),
        ("sweep.lora.rank=[]", "--set sweep.lora.rank=[]: sweep.lora.rank: empty list"),
        ("sweep.training.steps=[1, 2]", "sweep key training.steps cannot be swept"),
        ("training.layout=[8, 4]", "training.layout: rank ceilings must increase, got [8, 4]"),
        ("training.layout=[]", "training.layout: empty list; give rank ceilings"),
        ("training.layout=rows", "training.layout: expected one of auto, groups, padded or"),
        ("sweep.lora.rnk=[1]", "sweep key lora.rnk is not a config key (did you mean lora.rank?)"),
        # The file sweeps lora.rank: a plain value there would be silently ignored.
        ("lora.rank=4", "--set lora.rank=4: lora.rank is swept; set sweep.lora.rank=[...] instead"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    path = write(tmp_path, ISSUE_EXAMPLE)
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    message = one_line(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_apply_overrides_does_not_mutate_its_input():
    raw = {"lora": {"rank": 4}}
    out = apply_overrides(raw, ["lora.rank=8", "training.lr=1e-3"], "run.yaml")
    assert raw == {"lora": {"rank": 4}}
    # Raw values stay as YAML read them (`1e-3` is a string); parse_config coerces them.
    assert out == {"lora": {"rank": 8}, "training": {"lr": "1e-3"}}


def test_with_value_and_replace():
    config = parse(ISSUE_EXAMPLE)
    assert config.with_value("training.lr", "2e-4").training.lr == 2e-4
    assert config.with_value("eval", {}).eval == EvalSection()
    assert config.with_value("sweep.lora.rank", [4, 8]).sweep[0] == ("lora.rank", (4, 8))
    with pytest.raises(ConfigError, match=r"training\.lr: must be > 0"):
        config.with_value("training.lr", 0)
    with pytest.raises(ConfigError, match=r"lora\.rank is swept"):
        config.with_value("lora.rank", 4)
    replaced = config.replace(training=TrainingSection(lr=1e-3), sweep={"training.seed": [1, 2]})
    assert replaced.training.lr == 1e-3 and replaced.sweep == (("training.seed", (1, 2)),)
    assert replaced.training.seed == 1  # the grid carries the first value of each axis
    with pytest.raises(ConfigError, match=r"unknown section trainin \(did you mean training\?\)"):
        config.replace(trainin=TrainingSection())
    with pytest.raises(ConfigError, match="lora: expected a LoRASection"):
        config.replace(lora={"rank": 4})


# --------------------------------------------------------------------------- the grid


def test_cell_config_equals_the_plain_config(tmp_path):
    """The trainer's invariant: a cell is the file without its sweep, the values written plainly."""
    grid_text = """\
        model: {path: tiny-qwen3}
        lora: {rank: 8, targets: attention}
        data: {dataset: text, size_tokens: null}
        training: {lr: 1.0e-3}
        sweep:
          lora.rank: [2, 16]
          lora.targets: [mlp, [v, q]]
          data.path: [a.txt, b.txt]
          data.size_rows: [10]
          training.lr: [5e-5, 1e-4]
          training.clip_norm: [null, 0.5]
    """
    grid = load_config(write(tmp_path, grid_text))
    cells = grid.cells()
    assert len(cells) == 2 * 2 * 2 * 1 * 2 * 2
    assert len({c.name for c in cells}) == len(cells)
    base = yaml.safe_load(textwrap.dedent(grid_text))
    del base["sweep"]
    for cell in cells:
        raw = yaml.safe_load(yaml.safe_dump(base))
        for key, value in cell.values:
            section, leaf = key.split(".")
            raw.setdefault(section, {})[leaf] = list(value) if isinstance(value, tuple) else value
        plain = parse_config(raw)
        assert cell.config == plain
        assert cell.config.fingerprint() == plain.fingerprint()
        assert cell.config.cells()[0].config == cell.config
    # The same via --set on the file without its sweep.
    path = write(tmp_path, yaml.safe_dump(base), "plain.yaml")
    sets = ["lora.rank=16", "lora.targets=[q,v]", "data.path=b.txt", "data.size_rows=10"]
    sets += ["training.lr=1e-4", "training.clip_norm=0.5"]
    by_name = {c.name: c for c in cells}
    cell = by_name["rank16-targetsq_proj+v_proj-pathb.txt-size_rows10-lr0.0001-clip_norm0.5"]
    assert load_config(path, sets) == cell.config


def test_cell_names():
    config = parse("""
        sweep:
          lora.rank: [8]
          data.size_tokens: [1000]
          training.lr: [5e-5]
          lora.targets: [[q_proj, v_proj]]
          lora.use_rslora: [true]
          training.clip_norm: [null]
          data.path: ["/data/pb v2.json"]
    """)
    assert config.cells()[0].name == (
        "rank8-size_tokens1000-lr5e-05-targetsq_proj+v_proj-use_rsloratrue"
        "-clip_normnull-path_data_pb_v2.json"
    )
    # Values that differ only in characters a file name cannot hold still get distinct names.
    clash = parse("""
        data: {dataset: text}
        sweep: {data.path: [a/b, a b, a_b]}
    """)
    names = [c.name for c in clash.cells()]
    assert names[0] == "patha_b" and len(set(names)) == 3
    # A long grid key stays a usable file name.
    long = parse(f"""
        data: {{dataset: text}}
        sweep: {{data.path: ["{"x" * 300}", "{"x" * 299}y"]}}
    """)
    names = [c.name for c in long.cells()]
    assert all(len(n) <= 120 for n in names) and len(set(names)) == 2


def test_large_grid_names_are_distinct():
    config = parse("""
        sweep:
          lora.rank: [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
          data.size_tokens: [1000, 2000, 5000, 10000, 20000]
          data.dataset: [phonebook]
          training.lr: [1e-5, 5e-5, 1.0e-4]
          training.seed: [0, 1]
          data.seed: [0, 1]
    """)
    names = [c.name for c in config.cells()]
    assert len(names) == 10 * 5 * 3 * 2 * 2
    assert len(set(names)) == len(names)
    assert names[0] == "rank2-size_tokens1000-datasetphonebook-lr1e-05-seed0-seed0"


# --------------------------------------------------------------------------- serialisation


def test_to_yaml_round_trips(tmp_path):
    for text in (
        ISSUE_EXAMPLE,
        "{}",
        "eval: {batch_size: 8}\nlora: {targets: [q, v], layers: [1]}",
    ):
        config = parse(text)
        again = parse_config(yaml.safe_load(config.to_yaml()))
        assert again == config and again.fingerprint() == config.fingerprint()
        assert parse_config(config.to_dict()) == config
        path = write(tmp_path, config.to_yaml(), "again.yaml")
        assert load_config(path) == config
    # The YAML key of checkpoint.async_ is `async`, floats stay floats.
    dumped = yaml.safe_load(parse(ISSUE_EXAMPLE).to_yaml())
    assert dumped["checkpoint"]["async"] is True
    assert dumped["training"]["lr"] == 5e-5


def test_fingerprint():
    config = parse(ISSUE_EXAMPLE)
    fp = config.fingerprint()
    assert len(fp) == 64 and fp == parse(ISSUE_EXAMPLE).fingerprint()
    # Spelling does not matter; values do.
    assert parse(ISSUE_EXAMPLE.replace("lr: 5.0e-5", "lr: 5e-5")).fingerprint() == fp
    assert config.with_value("training.lr", 1e-4).fingerprint() != fp
    assert config.with_value("sweep.lora.rank", [2, 4, 8]).fingerprint() != fp
    assert config.with_value("eval", {}).fingerprint() != fp
    # The sweep order is the cell order, so it is part of the identity.
    swapped = config.with_value("sweep", dict(reversed(config.to_dict()["sweep"].items())))
    assert swapped != config and swapped.fingerprint() != fp
    assert {c.config for c in swapped.cells()} == {c.config for c in config.cells()}
    # The plain value under a swept key is shadowed by the sweep and does not count.
    assert parse(ISSUE_EXAMPLE.replace("rank: 8", "rank: 64")).fingerprint() == fp
    # The source file name is not part of the config.
    assert parse_config(config.to_dict(), "elsewhere.yaml").fingerprint() == fp


# --------------------------------------------------------------------------- consistency


def test_target_names_match_the_lora_module():
    from jaxlora import config as config_module
    from jaxlora.lora import TARGET_GROUPS
    from jaxlora.models.transformer import LINEAR_MODULES

    assert config_module.LINEAR_MODULES == LINEAR_MODULES
    assert tuple(TARGET_GROUPS) == config_module.TARGET_GROUPS


# Imports jaxlora.config with JAX and flax unimportable, the jaxlora package standing in for its
# __init__ (which exports the models), and validates a memory section's methods with it.
NO_JAX = """
import importlib.abc, sys, types

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("jax", "jaxlib", "flax", "numpy"):
            raise ImportError(f"config validation imported {name}")

sys.meta_path.insert(0, Blocked())
package = types.ModuleType("jaxlora")
package.__path__ = [sys.argv[1]]
sys.modules["jaxlora"] = package

from jaxlora.config import parse_section
from jaxlora.errors import ConfigError

parse_section("memory", {"methods": ["oracle", "bm25@3/ties", "base+rag@3"], "template": "quality"})
try:
    parse_section("memory", {"methods": ["bm25@3"]})
except ConfigError as e:
    assert "memory.methods[0]" in str(e) and "needs a combiner" in str(e), e
else:
    raise AssertionError("bm25@3 passed")
print("ok", sorted(m for m in sys.modules if m.startswith("jaxlora")))
"""


def test_config_validation_imports_no_jax():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", NO_JAX, str(REPO / "jaxlora")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "jaxlora.memory.grammar" in out.stdout
    assert "jaxlora.memory.merging" not in out.stdout


def test_readme_documents_every_key():
    readme = REPO / "configs" / "README.md"
    text = readme.read_text()
    for key in config_keys():
        assert f"`{key.partition('.')[2]}`" in text, f"{key} is not documented in {readme}"


def test_the_generated_reference_is_current():
    from jaxlora.config.reference import reference

    page = REPO / "docs" / "config.md"
    assert page.read_text() == reference(), (
        f"{page} is stale: python -m jaxlora.config.reference > docs/config.md"
    )


def test_the_reference_shows_every_key_with_its_schema():
    from jaxlora.config.reference import reference

    text = reference()
    for key in config_keys():
        section, _, name = key.partition(".")
        assert f"## `{section}`" in text and f"| `{name}` |" in text, key
    # types, bounds, defaults, sweepability and the schema's own comments
    assert "| `rank` | int, > 0 | `8` | yes |" in text
    assert "| `dtype` | `float32` \\| `bfloat16` \\| `float16` | `float32` | no |" in text
    assert "The column naming each row's document" in text


@pytest.mark.parametrize(
    "path",
    # Training configs (a `jaxlora synth` config is parsed by tests/test_synth.py).
    [
        p
        for p in sorted((REPO / "configs").glob("*.yaml"))
        if "synth" not in yaml.safe_load(p.read_text())
    ]
    or [None],
    ids=lambda p: p.name if p else "none",
)
def test_shipped_configs_parse(path):
    if path is None:
        pytest.skip("no configs/*.yaml yet")
    config = load_config(path)
    assert config.cells()
    assert parse_config(yaml.safe_load(config.to_yaml())) == config
