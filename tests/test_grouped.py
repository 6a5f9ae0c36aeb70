"""Grouped decoding and scoring (`jaxlora.grouped`): each row of a batch through its own adapter
of a library, rows sorted by adapter, checked against each row run alone with its adapter and
against the whole batch, both through the per-row gather (`routed_logits`, `generate_routed`:
a stack of one-row adapters, vmapped)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import grouped, lora
from jaxlora.errors import LoRAError
from jaxlora.generate import Sampling, generate_routed, until_eos
from jaxlora.llm.engine import Engine, Row

# Different ranks, targets, layers and a PiSSA adapter (the residual correction is grouped
# too); adapter 4 is used by no row (an empty group).
CONFIGS = [
    lora.LoRAConfig(rank=4),
    lora.LoRAConfig(rank=8, targets=("q_proj", "v_proj")),
    lora.LoRAConfig(rank=4, init="pissa"),
    lora.LoRAConfig(rank=2, layers=(1,)),
    lora.LoRAConfig(rank=4),
]
IDS = [3, 0, 1, 1, 2, 0, 3]  # unsorted, repeated, adapter 4 unused

# float32 logits of |value| <= ~10: the grouped and the per-row products sum the same terms in
# different orders (the dense lowering of ragged_dot on a CPU adds exact zeros for the other
# groups), which moves a logit by a few float32 ulps of the sums it comes from; measured
# ~1e-6, bounded with 100x margin.
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return jaxlora.load_pretrained("tiny-llama")


def random_b(stack: lora.AdapterStack, seed: int = 0) -> lora.AdapterStack:
    """B drawn at random (a fresh adapter's B is 0: every adapter would equal the base)."""
    rng = np.random.default_rng(seed)

    def fill(path, var):
        if path[-1] != "lora_b":
            return var
        x = var.get_value()
        return var.replace(x + rng.normal(0, 0.05, x.shape).astype(np.float32))

    return lora.AdapterStack(
        nnx.map_state(fill, stack.weights), stack.consts, stack.configs, stack.names
    )


@pytest.fixture(scope="module")
def stack(model):
    names = [f"a{i}" for i in range(len(CONFIGS))]
    return random_b(lora.init_adapters(model, CONFIGS, range(1, len(CONFIGS) + 1), names))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 200, (len(IDS), 12))
    mask = np.ones(ids.shape, bool)
    mask[2, :5] = False  # a shorter (left-padded) prompt
    return ids, mask


def test_grouped_logits_equal_each_row_alone(model, stack, prompts):
    ids, mask = prompts
    got = np.asarray(grouped.grouped_logits(model, stack, IDS, ids, mask))
    for b, a in enumerate(IDS):
        alone = lora.routed_logits(model, stack, [a], ids[b : b + 1], mask[b : b + 1])[0]
        np.testing.assert_allclose(got[b][mask[b]], np.asarray(alone)[mask[b]], atol=LOGIT_ATOL)
    gathered = np.asarray(lora.routed_logits(model, stack, IDS, ids, mask))
    np.testing.assert_allclose(got[mask], gathered[mask], atol=LOGIT_ATOL)
    # The adapters differ from each other and from the base, so a row given the wrong adapter
    # would fail the comparisons above.
    base = np.asarray(model(ids, mask))
    assert np.abs(got[mask] - base[mask]).max() > 100 * LOGIT_ATOL


def test_generate_grouped_equals_each_row_alone(model, stack, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=12, eos_token_ids=[])
    greedy = grouped.generate_grouped(model, stack, IDS, ids, mask, **kw)
    for b, a in enumerate(IDS):
        alone = generate_routed(model, stack, [a], ids[b : b + 1], mask[b : b + 1], **kw)
        np.testing.assert_array_equal(greedy[b], alone[0])
    np.testing.assert_array_equal(greedy, generate_routed(model, stack, IDS, ids, mask, **kw))
    # Sampled: row b draws with key(seed_b) wherever sorting puts it.
    seeds, sampling = list(range(10, 10 + len(IDS))), Sampling(1.0, 0.9)
    sampled = grouped.generate_grouped(
        model, stack, IDS, ids, mask, sampling=sampling, seed=seeds, **kw
    )
    routed = generate_routed(model, stack, IDS, ids, mask, sampling=sampling, seed=seeds, **kw)
    np.testing.assert_array_equal(sampled, routed)
    assert (sampled != greedy).any()


def test_bad_adapter_ids_are_refused(model, stack, prompts):
    ids, mask = prompts
    with pytest.raises(LoRAError, match="adapter_ids must be"):
        grouped.grouped_logits(model, stack, [0, 5, 1, 1, 2, 0, 3], ids, mask)
    with pytest.raises(LoRAError, match="7 rows need as many adapter ids"):
        grouped.generate_grouped(model, stack, [0, 1], ids, mask)


def test_dora_stacks_decode_per_row_in_the_engine(model, prompts):
    configs = [lora.LoRAConfig(rank=4, use_dora=True), lora.LoRAConfig(rank=4)]
    stack = random_b(lora.init_adapters(model, configs, [1, 2], ["d", "p"]), seed=3)
    assert not grouped.groupable(stack)
    with pytest.raises(LoRAError, match="DoRA"):
        grouped.library_graph(model, stack, 2)
    ids, _ = prompts
    engine = Engine(model, stack, grouped=True)  # asked for, but DoRA decodes per row
    slots = [1, 0, 2, 1]  # base, DoRA and plain rows in one pass
    rows = [Row(tuple(int(t) for t in ids[b]), s, max_tokens=8) for b, s in enumerate(slots)]
    outputs = engine.run(rows)
    reference = generate_routed(
        model, engine.stack, slots, ids[: len(slots)], max_new_tokens=8, eos_token_ids=[]
    )
    for b, out in enumerate(outputs):
        assert list(out.tokens) == until_eos(reference[b], engine.eos)


@pytest.mark.parametrize("grouped_pass", [True, False], ids=["grouped", "per-row"])
def test_engine_pass_mixing_adapters_equals_each_request_alone(model, stack, prompts, grouped_pass):
    """A pass sorts its rows by adapter; each output still belongs to its own request."""
    ids, _ = prompts
    engine = Engine(model, stack, grouped=grouped_pass)
    rows = [
        Row(tuple(int(t) for t in ids[b]), slot, max_tokens=6 + b, temperature=t, seed=b)
        for b, (slot, t) in enumerate(
            zip([3, 0, 5, 1, 3, 2, 0], [0, 1, 0, 1, 0, 0, 1], strict=True)
        )
    ]
    together = engine.run(rows)
    for row, out in zip(rows, together, strict=True):
        assert engine.run([row])[0] == out
    assert len({o.tokens for o in together}) > 1


def test_engine_scores_grouped_equal_per_row(model, stack, prompts):
    """Log-probabilities (`Engine.score`) of a mixed pass, grouped and per row."""
    ids, _ = prompts
    rows = [
        Row(tuple(int(t) for t in ids[b]), slot, max_tokens=4, logprobs=2, echo=True)
        for b, slot in enumerate([2, 0, 5, 1])
    ]
    scored = {}
    for grouped_pass in (True, False):
        engine = Engine(model, stack, grouped=grouped_pass)
        scored[grouped_pass] = engine.score(rows, engine.run(rows))
    for a, b in zip(scored[True], scored[False], strict=True):
        assert a.tokens == b.tokens and a.scores.tokens == b.scores.tokens
        # log-probabilities of float32 logits: LOGIT_ATOL's reasoning, through log_softmax.
        got = np.array(a.scores.logprobs[1:], float)
        np.testing.assert_allclose(got, np.array(b.scores.logprobs[1:], float), atol=LOGIT_ATOL)


def test_grouping_sorts_rows_and_pads_the_library_to_a_power_of_two_with_empty_groups():
    g = grouped.Grouping.of([4, 1, 7, 4, 1, 4], 8, 6)
    assert g.order.tolist() == [1, 4, 0, 3, 5, 2]  # stable: equal ids keep their order
    assert g.active.tolist() == [1, 4, 7, 7] and g.rows.tolist() == [2, 3, 1, 0]
    assert g.unsort(g.sort(np.arange(6) * 10)).tolist() == [0, 10, 20, 30, 40, 50]
    one = grouped.Grouping.of([5, 5], 8, 2)
    assert one.active.tolist() == [5] and one.rows.tolist() == [2]


def test_engine_chooses_per_row_unless_told(model, stack):
    """`grouped=None` groups only on a TPU with shared adapters (measured there); a stack with
    DoRA adapters never groups."""
    shared, distinct = [1] * 8, list(range(8))
    auto = Engine(model, stack)
    on_tpu = jax.tree.leaves(model.params)[0].devices().pop().platform == "tpu"  # the weights
    assert auto._grouped_pass(auto.stack, shared) is on_tpu
    assert not auto._grouped_pass(auto.stack, distinct)
    assert Engine(model, stack, grouped=True)._grouped_pass(auto.stack, distinct)
    assert not Engine(model, stack, grouped=False)._grouped_pass(auto.stack, shared)
