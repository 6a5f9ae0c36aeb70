"""QuALITY scored by the log-likelihood of each option (`MemoryEvaluator.option_logprobs`):
the batched [question x option] passes equal sums of `model(ids, adapters=...)` log-probs
computed one option at a time, for the base model, one routed adapter, a per-token mixture and
a merge; the scores follow the options' text, so reordering the options moves the answer."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import load_config
from jaxlora.eval import metrics, scoring
from jaxlora.job import Job
from jaxlora.memory.compose import parse_method
from jaxlora.memory.evaluate import MemoryEvaluator
from jaxlora.memory.library import load_libraries
from jaxlora.memory.merging import merge
from tests.test_documents_run import _train, write_quality

OPTIONS = (
    ["Nine years", "Two years", "A month", "Forty years"],
    ["Rye loaves", "Fish", "Salt", "Wine"],
    ["Drilled for water", "Sang", "Slept", "Flew"],
)


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory) -> Path:
    """A tiny QuALITY memory: 2 articles in 96-token chunks, one adapter each, 3 questions."""
    tmp = tmp_path_factory.mktemp("quality")
    path = write_quality(tmp, OPTIONS)
    data = {"dataset": "quality", "path": str(path), "units": "chunks",
            "unit_tokens": 48, "unit_overlap": 8, "max_length": 56}  # fmt: skip
    memory = {"methods": ["base", "bm25", "bm25@2/mixture", "bm25@2/ties", "base+rag@2"],
              "template": "quality", "scope": "document", "max_new_tokens": 4,
              "batch_size": 8}  # fmt: skip
    out, _ = _train(tmp, data, memory=memory)
    return out


def _evaluator(run: Path) -> MemoryEvaluator:
    config = load_config(run / "config.yaml")
    job = Job(config, jax.devices()[:1])
    (library,) = load_libraries(job, run)
    return MemoryEvaluator(job, config.memory, library, run)


def _by_hand(ev: MemoryEvaluator, method: str, prompts) -> list[list[float]]:
    """Each option alone: the full logits of `model(ids[, adapters=])`, summed by hand."""
    m = parse_method(method)
    route = ev.route(m.router, m.k) if m.uses_adapters else None
    options = ev.option_ids()
    out = []
    for q, prompt in enumerate(prompts):
        sums = []
        for opt in options[q]:
            ids = jnp.asarray([list(prompt) + list(opt)], jnp.int32)
            targets = np.asarray(ids[0, len(prompt) :])
            if route is None:
                members = [ev.model(ids)]  # [1, T, V]
            elif m.combiner in ("one", "mixture"):
                stack = ev.lib.stack
                members = [
                    ev.model(ids[None], adapters=stack.select([int(u)]))[0]
                    for u in route.indices[q, : m.k]
                ]
            else:
                merged = merge(
                    ev.model,
                    ev.lib.stack,
                    indices=[route.indices[q, : m.k].tolist()],
                    weights=[ev.merge_weights(m)],
                    combination_type=m.combiner,
                    density=ev.m.density,
                    majority_sign_method=ev.m.majority_sign_method,
                    seed=ev.m.seed,
                )
                members = [ev.model(ids[None], adapters=merged)[0]]
            logp = np.stack([np.asarray(jax.nn.log_softmax(x[0], -1)) for x in members])
            # Token t of the option is predicted at position len(prompt) + t - 1.
            at = np.arange(len(prompt) - 1, len(prompt) - 1 + len(opt))
            per_token = logp[:, at, targets]  # [members, tokens]
            mixed = np.logaddexp.reduce(per_token, axis=0) - np.log(len(members))
            sums.append(float(mixed.sum()))
        out.append(sums)
    return out


@pytest.mark.parametrize("method", ["base", "bm25", "bm25@2/mixture", "bm25@2/ties", "base+rag@2"])
def test_batched_option_logprobs_equal_one_at_a_time(quality_run, method):
    ev = _evaluator(quality_run)
    m = parse_method(method)
    ev._plan_routes([m])
    prompts = ev.prompts(ev.contexts(m)[0])
    batched = ev.option_logprobs(m, prompts)
    assert [len(s) for s in batched] == [4, 4, 4]
    # float32 log-probs summed over each option's tokens, batched and padded vs one at a time
    # (another reduction order): rounding of sums of order 10; the argmax below is exact
    np.testing.assert_allclose(batched, _by_hand(ev, method, prompts), rtol=1e-4, atol=1e-4)
    choices = [metrics.loglik_choice(s) for s in batched]
    assert choices == [int(np.argmax(s)) for s in _by_hand(ev, method, prompts)]


def test_reordered_options_move_the_answer(quality_run):
    """The score belongs to the option's text: reversed options give reversed scores, so the
    same gold index is right in one order and wrong in the other."""
    ev = _evaluator(quality_run)
    m = parse_method("bm25")
    ev._plan_routes([m])
    prompts = ev.prompts(ev.contexts(m)[0])
    before = ev.option_logprobs(m, prompts)
    ev.questions = [
        dataclasses.replace(q, source=dataclasses.replace(q.source, options=q.source.options[::-1]))
        for q in ev.questions
    ]
    after = ev.option_logprobs(m, prompts)
    # the same option text at another batch position: float32 rounding only; a score that
    # followed the position instead of the text would differ by ~1 (distinct options)
    np.testing.assert_allclose(after, [s[::-1] for s in before], rtol=1e-5, atol=1e-5)
    for q, b, a in zip(ev.questions, before, after, strict=True):
        gold = dataclasses.replace(q.source, gold=metrics.loglik_choice(b))
        assert scoring.loglik_score(b, gold)["loglik_accuracy"] == 1.0
        assert scoring.loglik_score(a, gold)["loglik_accuracy"] == 0.0


def test_results_have_loglik_columns_and_predictions_their_scores(quality_run):
    rows = {r["method"]: r for r in csv.DictReader((quality_run / "memory_results.csv").open())}
    for row in rows.values():
        assert 0.0 <= float(row["loglik_accuracy"]) <= 1.0
        assert 0.0 <= float(row["loglik_hard_accuracy"]) <= 1.0
    preds = [
        json.loads(x) for x in (quality_run / "memory_predictions.jsonl").read_text().splitlines()
    ]
    for p in preds:
        assert len(p["option_logprobs"]) == 4
        assert p["loglik_choice"] == "ABCD"[int(np.argmax(p["option_logprobs"]))]
    # The column is the mean of the per-question picks against the gold letters.
    base = [p for p in preds if p["method"] == "base"]
    right = np.mean([p["loglik_choice"] == p["gold"] for p in base])
    # a float mean read back from the CSV: rounding only; one pick more or less is 1/n
    assert float(rows["base"]["loglik_accuracy"]) == pytest.approx(right)


def test_option_logprobs_equal_transformers_and_peft(quality_run, tmp_path):
    """The acceptance check against PyTorch: the base model's option scores equal transformers'
    on the same checkpoint, and a routed adapter's equal PEFT's, summed over each option's
    tokens after the same prompt ids."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import jaxlora

    ev = _evaluator(quality_run)
    ev.model.save_hf(tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    options = ev.option_ids()
    for method in ("base", "bm25"):
        m = parse_method(method)
        ev._plan_routes([m])
        prompts = ev.prompts(ev.contexts(m)[0])
        ours = ev.option_logprobs(m, prompts)
        for q, prompt in enumerate(prompts):
            torch_model = hf
            if m.uses_adapters:
                unit = int(ev.route(m.router, 1).indices[q, 0])
                path = jaxlora.save_peft(ev.model, ev.lib.stack, unit, tmp_path / f"a{q}")
                torch_model = PeftModel.from_pretrained(hf, path).eval()
            want = []
            for opt in options[q]:
                ids = torch.tensor([list(prompt) + list(opt)])
                with torch.no_grad():
                    logp = torch.log_softmax(torch_model(input_ids=ids).logits[0], -1).numpy()
                at = np.arange(len(prompt) - 1, len(prompt) - 1 + len(opt))
                want.append(float(logp[at, list(opt)].sum()))
            if m.uses_adapters:
                torch_model.unload()  # the base back as it was for the next question
            # float32 on both sides, differing in reduction order over ~100-token prompts of a
            # 2-layer model: ~1e-5 per token; a wrong position or token id moves a sum by > 0.1.
            np.testing.assert_allclose(ours[q], want, rtol=1e-4, atol=1e-3)
