"""Sampled decoding: temperature 0 is greedy, a seed reproduces, rows never depend on their
batch, and the first token's frequencies follow transformers' temperature / top-k / top-p
warpers applied to the model's own logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import jaxlora
from jaxlora import lora
from jaxlora.errors import JaxloraError
from jaxlora.generate import Sampling, generate, generate_routed, generate_stack


@pytest.fixture(scope="module")
def model():
    return jaxlora.load_pretrained("tiny-llama")


def prompts(model, n: int = 3):
    texts = ["Question: What is the phone number of", "The capital of", "Once upon a time"]
    rows = [model.tokenizer(t)["input_ids"] for t in texts[:n]]
    width = max(map(len, rows))
    ids = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), bool)
    for i, r in enumerate(rows):  # right-padded: generate left-aligns them itself
        ids[i, : len(r)], mask[i, : len(r)] = r, True
    return ids, mask


def test_temperature_zero_is_greedy_whatever_top_k_and_top_p(model):
    ids, mask = prompts(model)
    greedy = generate(model, ids, mask, max_new_tokens=12)
    cold = Sampling(temperature=0.0, top_k=5, top_p=0.3)
    np.testing.assert_array_equal(
        generate(model, ids, mask, max_new_tokens=12, sampling=cold, seed=7), greedy
    )
    # top_k = 1 leaves the argmax alone, at any temperature
    one = Sampling(temperature=2.0, top_k=1)
    np.testing.assert_array_equal(
        generate(model, ids, mask, max_new_tokens=12, sampling=one, seed=7), greedy
    )


def test_a_seed_reproduces_and_another_seed_differs(model):
    ids, mask = prompts(model)
    hot = Sampling(temperature=1.0)
    a = generate(model, ids, mask, max_new_tokens=12, sampling=hot, seed=1)
    b = generate(model, ids, mask, max_new_tokens=12, sampling=hot, seed=1)
    c = generate(model, ids, mask, max_new_tokens=12, sampling=hot, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != generate(model, ids, mask, max_new_tokens=12)).any()


def test_rows_with_their_own_settings_equal_rows_decoded_alone(model):
    ids, mask = prompts(model)
    settings = [
        Sampling(),
        Sampling(temperature=0.8, top_k=20),
        Sampling(temperature=1.2, top_p=0.9),
    ]
    seeds = [11, 12, 13]
    batch = generate(model, ids, mask, max_new_tokens=10, sampling=settings, seed=seeds)
    for b in range(3):
        alone = generate(
            model,
            ids[b : b + 1],
            mask[b : b + 1],
            max_new_tokens=10,
            sampling=settings[b],
            seed=[seeds[b]],
        )
        np.testing.assert_array_equal(batch[b], alone[0])


def test_routed_rows_sample_like_their_adapter_alone(model):
    configs = [lora.LoRAConfig(rank=4)] * 2
    fresh = lora.init_adapters(model, configs, [1, 2])
    # B = 0 at init would make every adapter the base model: move both away from it
    stack = lora.AdapterStack(
        jax.tree.map(lambda x: x + 0.05, fresh.weights), fresh.consts, fresh.configs, fresh.names
    )
    ids, mask = prompts(model)
    hot = Sampling(temperature=0.9, top_p=0.95)
    routed = generate_routed(
        model, stack, [1, 0, 1], ids, mask, max_new_tokens=8, sampling=hot, seed=[5, 6, 7]
    )
    for b, (a, s) in enumerate(zip([1, 0, 1], [5, 6, 7], strict=True)):
        one = lora.AdapterStack(
            jax.tree.map(lambda x, a=a: x[a : a + 1], stack.weights),
            jax.tree.map(lambda x, a=a: x[a : a + 1], stack.consts),
            stack.configs[a : a + 1],
            stack.names[a : a + 1],
        )
        alone = generate_stack(
            model,
            one,
            ids[None, b : b + 1],
            mask[None, b : b + 1],
            max_new_tokens=8,
            sampling=hot,
            seed=[s],
        )
        np.testing.assert_array_equal(routed[b], alone[0, 0])


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=1.0),
        Sampling(temperature=0.7, top_k=8),
        Sampling(temperature=1.3, top_p=0.6),
    ],
)
def test_first_token_frequencies_follow_the_transformers_warpers(model, sampling):
    """N draws of the first new token against the distribution that transformers' warpers make
    of the model's own logits (float64)."""
    ids, mask = prompts(model, 1)
    logits = np.asarray(model(ids, mask))[0, int(mask[0].sum()) - 1].astype(np.float64)
    scores = torch.tensor(logits)[None]
    scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    p = torch.softmax(scores, -1)[0].numpy()

    n = 4000
    draws = generate(
        model,
        np.repeat(ids, n, 0),
        np.repeat(mask, n, 0),
        max_new_tokens=1,
        sampling=sampling,
        seed=3,
    )[:, 0]
    freq = np.bincount(draws, minlength=p.size) / n
    # tokens the warpers remove are never drawn
    assert freq[p == 0].sum() == 0
    # each kept token within 5 binomial standard deviations (+ 1/n for a rare token's one
    # draw): over <= 512 tokens a false alarm has probability < 1e-3, and the draws are seeded
    sigma = np.sqrt(p * (1 - p) / n)
    assert (np.abs(freq - p) <= 5 * sigma + 1 / n).all(), np.abs(freq - p).max()
    assert (p > 0).sum() > 1  # a real distribution, not a single token


def test_bad_sampling_settings_are_errors():
    for kw, needle in [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ]:
        with pytest.raises(JaxloraError, match=needle):
            Sampling(**kw)


def test_settings_and_seeds_must_fit_the_rows(model):
    ids, mask = prompts(model)
    with pytest.raises(JaxloraError, match="2 sampling settings for 3 rows"):
        generate(model, ids, mask, max_new_tokens=2, sampling=[Sampling()] * 2)
    with pytest.raises(JaxloraError, match="2 seeds for 3 rows"):
        generate(
            model, ids, mask, max_new_tokens=2, sampling=Sampling(temperature=1.0), seed=[1, 2]
        )
