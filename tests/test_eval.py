"""Batched evaluation against one-at-a-time references: PEFT generation, sequential decoding of
each question with the adapter merged, torch log-probabilities for CounterFact efficacy."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel

import jaxlora
from jaxlora import data as kdata
from jaxlora import lora
from jaxlora.config import load_config
from jaxlora.eval import metrics
from jaxlora.evaluate import build_questions
from jaxlora.generate import generate, generate_routed, generate_stack
from jaxlora.sweep import SweepJob
from tests.conftest import RUN
from tests.hf_factory import load_hf_model
from tests.test_lora import random_peft_adapter
from tests.test_model_parity import padded_batch

PEFT_ADAPTERS = [
    dict(r=2, target_modules="all-linear"),
    dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=4, target_modules="all-linear", use_rslora=True),
]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def peft_stack(request, hf_checkpoint, tmp_path_factory):
    path = hf_checkpoint(request.param)
    tmp = tmp_path_factory.mktemp(f"peft-{request.param}")
    for i, kw in enumerate(PEFT_ADAPTERS):
        random_peft_adapter(path, tmp / f"a{i}", seed=i, **kw)
    model = jaxlora.load_pretrained(path)
    return path, model, jaxlora.load_peft(model, [tmp / f"a{i}" for i in range(3)]), tmp


def peft_generate(path, adapter_dir, ids, mask, n):
    peft_model = PeftModel.from_pretrained(load_hf_model(path), adapter_dir).eval()
    tok = jaxlora.load_pretrained(path).tokenizer
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        ).numpy()[:, ids.shape[1] :]
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=tok.pad_token_id)


def test_stacked_generation_equals_peft_generate(peft_stack):
    path, model, stack, tmp = peft_stack
    prompts = np.stack([padded_batch("left", seed=s)[0] for s in range(3)])
    masks = np.stack([padded_batch("left", seed=s)[1] for s in range(3)])
    ours = generate_stack(model, stack, prompts, masks, max_new_tokens=16)
    for a in range(3):
        np.testing.assert_array_equal(
            ours[a], peft_generate(path, tmp / f"a{a}", prompts[a], masks[a], 16)
        )


def test_routed_generation_equals_peft_generate_per_row(peft_stack):
    path, model, stack, tmp = peft_stack
    ids, mask = padded_batch("left", seed=7)
    adapter_ids = [2, 0, 1]
    ours = generate_routed(model, stack, adapter_ids, ids, mask, max_new_tokens=12)
    for row, a in enumerate(adapter_ids):
        ref = peft_generate(path, tmp / f"a{a}", ids[row : row + 1], mask[row : row + 1], 12)
        np.testing.assert_array_equal(ours[row], ref[0])


# ---------------------------------------------------------------------------------------------
# a trained grid, evaluated


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_batched_eval_equals_asking_one_question_at_a_time(evaluated_run):
    """Every adapter's predictions and accuracy, recomputed one question at a time with the
    adapter merged into the base (no stacking, no batching, no padding)."""
    config, run_dir = evaluated_run
    rows = read_csv(run_dir / "results.csv")
    predictions = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    model = jaxlora.load_pretrained("tiny-llama")
    accuracies = []
    for row, cell in zip(rows, config.cells(), strict=True):
        assert row["name"] == cell.name
        stack = jaxlora.load_peft(model, [run_dir / "adapters" / cell.name])
        merged = lora.merge(model, stack, 0)
        records = kdata.load_records(cell.config.data, model.tokenizer)
        questions = build_questions(records, model.tokenizer, cell.config.data, config.eval)
        assert int(row["n_facts"]) == len(questions) == len(records)
        mine = [p for p in predictions if p["adapter"] == cell.name]
        correct = []
        for q, p in zip(questions, mine, strict=True):
            out = generate(merged, np.asarray([q.prompt]), max_new_tokens=16)[0]
            text = model.tokenizer.decode(
                out[out != model.config.pad_token_id], skip_special_tokens=True
            )
            assert p["prediction"] == text
            assert p["answer"] == q.answer
            correct.append(metrics.phonebook_correct(text, q.answer))
        # a float mean read back from the CSV: approx's 1e-6 relative is rounding; one wrong
        # question moves it by 1/n
        assert float(row["accuracy"]) == pytest.approx(np.mean(correct))
        accuracies.append(float(row["accuracy"]))
    assert max(accuracies) >= 0.5  # the check above compares something that was learned


def test_results_and_report_files(evaluated_run):
    _, run_dir = evaluated_run
    rows = read_csv(run_dir / "results.csv")
    assert list(rows[0]) == [
        "name",
        "rank",
        "size_tokens",
        "n_facts",
        "trainable_params",
        "accuracy",
        "group_eval_seconds",
        "group_compile_seconds",
    ]
    assert {int(r["rank"]) for r in rows} == {2, 16} and {int(r["size_tokens"]) for r in rows} == {
        125,
        250,
    }
    report = (run_dir / "report.md").read_text()
    assert "T_max" in report or "T<sub>max</sub>" in report
    for stem in ("accuracy_vs_size", "capacity_vs_rank", "efficiency_vs_rank"):
        assert (run_dir / "plots" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (run_dir / "plots" / f"{stem}.svg").read_bytes()[:500]


def test_eval_command_reproduces_the_training_time_evaluation(evaluated_run, tmp_path):
    _, run_dir = evaluated_run
    before = read_csv(run_dir / "results.csv")
    predictions_before = (run_dir / "predictions.jsonl").read_text()
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "results.csv").unlink()
    subprocess.run(
        [sys.executable, "-m", "jaxlora.cli", "eval", str(copy)], check=True, capture_output=True
    )
    after = read_csv(copy / "results.csv")
    timing = ("group_eval_seconds", "group_compile_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(after) == strip(before)
    assert (copy / "predictions.jsonl").read_text() == predictions_before


# ---------------------------------------------------------------------------------------------
# CounterFact efficacy


ROME = [
    {
        "case_id": i,
        "pararel_idx": i,
        "requested_rewrite": {
            "prompt": p,
            "relation_id": "P0",
            "subject": s,
            "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"},
        },
        "paraphrase_prompts": [],
        "neighborhood_prompts": [],
        "attribute_prompts": [],
        "generation_prompts": [],
    }
    for i, (p, s, new, true) in enumerate(
        [
            ("{} is written in", "Lenta.ru", "Italian", "Russian"),
            ("The capital of {} is", "Norway", "Paris", "Oslo"),
            ("{} plays the", "Maria Garcia", "piano", "guitar"),
            # Both targets begin with the tiny tokenizer's token " L": the same first token
            # scores the same, a tie, which is a failure whatever the adapter learned.
            ("{} was born in", "John Smith", "Lisbon", "London"),
        ]
    )
]


@pytest.mark.slow
def test_counterfact_efficacy_equals_torch_probabilities(tmp_path):
    (tmp_path / "counterfact.json").write_text(json.dumps(ROME))
    run = {
        **RUN,
        "data": {
            "dataset": "counterfact",
            "path": str(tmp_path / "counterfact.json"),
            "size_rows": 4,
            "size_tokens": None,
            "chat_template": False,
            "loss_mask": "full",
            "max_length": 32,
        },
        "training": {**RUN["training"], "steps": 40},
        "sweep": {"lora.rank": [2, 8]},
    }
    (tmp_path / "cf.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    SweepJob(
        load_config(tmp_path / "cf.yaml"),
        tmp_path / "run",
        progress=False,
        devices=jax.devices()[:1],
    ).run()
    rows = read_csv(tmp_path / "run" / "results.csv")
    predictions = [
        json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    ]
    base = tmp_path / "base"
    model = jaxlora.load_pretrained("tiny-llama")
    model.save_hf(base)
    tok = model.tokenizer
    for row in rows:
        peft_model = PeftModel.from_pretrained(
            load_hf_model(base), tmp_path / "run" / "adapters" / row["name"]
        ).eval()
        mine = [p for p in predictions if p["adapter"] == row["name"]]
        expected = []
        for case in ROME:
            rw = case["requested_rewrite"]
            prompt = rw["prompt"].format(rw["subject"])
            first = []
            for target in (rw["target_new"]["str"], rw["target_true"]["str"]):
                full = tok(prompt + " " + target)["input_ids"]
                alone = tok(prompt)["input_ids"]
                k = next(
                    i for i, (a, b) in enumerate(zip(full, [*alone, None], strict=False)) if a != b
                )
                if not tok.decode(full[k]).strip():  # a lone space token belongs to the context
                    k += 1
                with torch.no_grad():
                    logits = peft_model(input_ids=torch.tensor([full[:k]])).logits[0, -1]
                first.append(torch.log_softmax(logits, -1)[full[k]].item())
            expected.append(float(first[0] > first[1]))
        assert [p["efficacy"] for p in mine] == expected
        # Both outcomes occur: the trained new targets win, the tie (the last fact) fails.
        assert expected[-1] == 0.0 and 1.0 in expected, expected
        # a float mean read back from the CSV: rounding only; one wrong outcome moves it by 1/n
        assert float(row["efficacy"]) == pytest.approx(np.mean(expected))


def test_a_grid_sized_by_rows_gets_its_capacity_report(tmp_path):
    """size_rows instead of size_tokens: results carry each adapter's knowledge in tokens (as
    a token budget counts them) and the capacity report is written."""
    from jaxlora.config import load_config
    from jaxlora.sweep import SweepJob
    from tests.runs import write_config

    cfg = write_config(
        tmp_path / "rows.yaml",
        **{
            "data.size_tokens": None,
            "data.size_rows": 2,
            "eval": {"max_new_tokens": 8},
            "sweep": {"lora.rank": [2, 4], "data.size_rows": [2, 4]},
            "training.steps": 2,
        },
    )
    job = SweepJob(load_config(cfg), tmp_path / "run", progress=False, devices=jax.devices()[:1])
    job.run()
    rows = read_csv(tmp_path / "run" / "results.csv")
    tok = job.model.tokenizer
    plans = {p.name: p for p in job.plans}
    for r in rows:
        n = int(r["n_facts"])
        texts = [rec.knowledge_text for rec in job.data.records(plans[r["name"]])]
        assert len(texts) == n
        expected = sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
        assert int(r["size_tokens"]) == expected
    assert {int(r["n_facts"]) for r in rows} == {2, 4}
    assert "T_max" in (tmp_path / "run" / "report.md").read_text()
