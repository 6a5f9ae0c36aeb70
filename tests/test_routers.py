"""Routers: embedding parity with transformers, BM25 on a generated PhoneBook, scope, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

import jaxlora
from jaxlora.data.phonebook import generate_phonebook
from jaxlora.errors import JaxloraError
from jaxlora.memory.routers import (
    BM25Router,
    EmbeddingRouter,
    OracleRouter,
    Route,
    RouterError,
    make_router,
    routing_accuracy,
)

# Lengths from 1 to ~60 tokens: three length buckets, and batches with filler rows.
TEXTS = [
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adapters store knowledge; routers pick which adapter answers a question.",
    "hello world",
    " ".join(["memory"] * 30) + " and a tail of other words to make it long",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def encoder(request, hf_checkpoint):
    """(our Model, transformers' AutoModel) of one tiny random checkpoint."""
    path = hf_checkpoint(request.param, num_heads=4, num_kv_heads=2)
    ref = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return jaxlora.load_pretrained(path, dtype="float32"), ref, path


def reference_embeddings(ref, tokenizer, texts, pooling):
    """Each text alone (no padding) through transformers, pooled as the pooling defines."""
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            h = ref(input_ids=ids).last_hidden_state[0].numpy()
        x = h.mean(0) if pooling == "mean" else h[-1]
        out.append(x / np.linalg.norm(x))
    return np.stack(out)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_embeddings_match_transformers(encoder, pooling, padding_side):
    model, ref, _ = encoder
    router = EmbeddingRouter(
        model, pooling=pooling, padding_side=padding_side, batch_size=4, progress=False
    )
    ours = router.encode(TEXTS)
    want = reference_embeddings(ref, model.tokenizer, TEXTS, pooling)
    # float32 on both sides, differing only in reduction order: unit vectors whose entries are
    # ~0.1 agree to ~1e-7 after two 64-wide layers; attending to a pad token, pooling a pad
    # position or an off-by-one in the last token moves them by > 1e-2.
    assert np.abs(ours - want).max() < 1e-5
    other = reference_embeddings(
        ref, model.tokenizer, TEXTS, "last" if pooling == "mean" else "mean"
    )
    assert np.abs(other - want).max() > 1e-2  # the two poolings are distinguishable


def test_identical_question_routes_to_its_key_and_instruction_is_for_queries_only(encoder):
    model, _, _ = encoder
    router = EmbeddingRouter(model, progress=False).fit(TEXTS)
    route = router.route(TEXTS, k=2)
    np.testing.assert_array_equal(route.indices[:, 0], np.arange(len(TEXTS)))
    # the cosine of a float32 unit vector with itself: 1 up to rounding over D terms
    np.testing.assert_allclose(route.scores[:, 0], 1.0, atol=1e-5)
    assert (route.scores[:, 1] < route.scores[:, 0]).all()

    instructed = EmbeddingRouter(model, instruction="Find the fact", progress=False).fit(TEXTS)
    # keys take no instruction: the same float32 forward (batch layout aside), rounding only
    np.testing.assert_allclose(instructed.key_emb_UD, router.key_emb_UD, atol=1e-6)
    scores = instructed.scores(["hello world"])
    plain = router.encode(["Instruct: Find the fact\nQuery:hello world"], "queries")
    # the same unit vectors dotted in another order: float32 rounding only
    np.testing.assert_allclose(scores, plain @ router.key_emb_UD.T, atol=1e-6)
    assert np.abs(scores - router.scores(["hello world"])).max() > 1e-3


def test_long_keys_are_an_error_unless_truncated(encoder):
    model, _, _ = encoder
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in TEXTS]
    long = [i for i, n in enumerate(lengths) if n > 16]
    assert 4 in long and 3 not in long
    with pytest.raises(RouterError, match="longer than max_length 16"):
        EmbeddingRouter(model, max_length=16, progress=False).fit(TEXTS)
    cut = EmbeddingRouter(model, max_length=16, truncate=True, progress=False).fit(TEXTS)
    assert cut.truncated == {"keys": len(long), "queries": 0}
    full = EmbeddingRouter(model, progress=False).fit(TEXTS)
    assert np.abs(cut.key_emb_UD[4] - full.key_emb_UD[4]).max() > 1e-3
    # key 3 fits max_length: only the batch's padding width differs, rounding only
    np.testing.assert_allclose(cut.key_emb_UD[3], full.key_emb_UD[3], atol=1e-6)


def test_key_embeddings_are_cached_and_invalidated(encoder, tmp_path):
    model, _, _ = encoder
    first = EmbeddingRouter(model, cache_dir=tmp_path, progress=False).fit(TEXTS)
    assert first.cache_path.exists() and first.cache_path.name.startswith("keys_")
    # Replace the cached values: a second router that reads the cache returns these.
    planted = np.random.default_rng(0).normal(size=first.key_emb_UD.shape).astype(np.float32)
    np.save(first.cache_path, planted)
    second = EmbeddingRouter(model, cache_dir=tmp_path, progress=False).fit(TEXTS)
    assert second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.key_emb_UD, planted)

    edited = [*TEXTS[:-1], TEXTS[-1] + " Rome is the capital of Italy."]
    third = EmbeddingRouter(model, cache_dir=tmp_path, progress=False).fit(edited)
    lasts = EmbeddingRouter(model, cache_dir=tmp_path, pooling="last", progress=False).fit(TEXTS)
    assert len({first.cache_path, third.cache_path, lasts.cache_path}) == 3
    assert np.abs(third.key_emb_UD - planted).max() > 1e-2
    assert len(list(tmp_path.glob("keys_*.npy"))) == 3
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_encoder_given_as_a_path_loads_and_caches(encoder, tmp_path):
    model, _, path = encoder
    kw = dict(cache_dir=tmp_path, max_length=16, truncate=True, progress=False)
    by_path = EmbeddingRouter(str(path), **kw).fit(TEXTS)
    by_model = EmbeddingRouter(model, max_length=16, truncate=True, progress=False).fit(TEXTS)
    # the same weights loaded from the path: the same float32 forward, rounding only
    np.testing.assert_allclose(by_path.key_emb_UD, by_model.key_emb_UD, atol=1e-6)
    again = EmbeddingRouter(str(path), **kw).fit(TEXTS)
    assert again.cache_path == by_path.cache_path
    assert again.truncated == by_path.truncated and again.truncated["keys"] > 0  # counted on a hit


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_encoder_saved_without_its_lm_head_loads(family, hf_checkpoint, tmp_path):
    """Embedding checkpoints (Qwen3-Embedding) are bare decoders saved by AutoModel: their
    tensors lack the "model." prefix and there is no LM head (their embeddings are tied)."""
    path = hf_checkpoint(family, num_heads=4, num_kv_heads=2, tie=True)
    bare_dir = tmp_path / "bare"
    AutoModel.from_pretrained(path, dtype=torch.float32).save_pretrained(bare_dir)
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (bare_dir / f.name).write_bytes(f.read_bytes())
    bare = EmbeddingRouter(str(bare_dir), progress=False).fit(TEXTS)
    full = EmbeddingRouter(str(path), progress=False).fit(TEXTS)
    np.testing.assert_array_equal(bare.key_emb_UD, full.key_emb_UD)  # the same weights


def phonebook_sectors(num_sectors=8, rows=48):
    book = generate_phonebook(num_sectors * rows, seed=0)
    keys = [
        "\n".join(
            f"Question: What is the phone number of {name}? Answer: {phone}"
            for name, phone in book[s * rows : (s + 1) * rows]
        )
        for s in range(num_sectors)
    ]
    questions = [f"What is the phone number of {name}?" for name, _ in book]
    units = [i // rows for i in range(len(book))]
    return keys, questions, units


def test_bm25_routes_phonebook_questions_to_their_sector():
    keys, questions, units = phonebook_sectors()
    route = make_router("bm25").fit(keys).route(questions, k=3)
    acc = routing_accuracy(route, units)
    assert acc["top1"] >= 0.95, acc
    assert acc["recall@3"] >= acc["top1"]
    assert (np.diff(route.scores, axis=1) <= 0).all()  # best first


def test_bm25_bigrams_route_study_sized_sectors():
    """The study's PhoneBook sectors (385 rows): every first and last name is in most sectors,
    so words alone do not find the sector; adjacent word pairs (the full name) do."""
    keys, questions, units = phonebook_sectors(16, 385)
    acc = routing_accuracy(BM25Router(ngrams=2).fit(keys).route(questions, k=1), units)
    assert acc["top1"] >= 0.99, acc
    keys = ["Mary Jones, John Smith", "Mary Smith lives by the old river bridge in town"]
    question = ["Where does Mary Smith live?"]
    assert BM25Router().fit(keys).route(question, 1).indices[0, 0] == 0  # shorter key wins
    assert BM25Router(ngrams=2).fit(keys).route(question, 1).indices[0, 0] == 1


def test_bm25_hand_made_cases():
    keys = [
        "The cat sat on the mat.",
        "Quantum chromodynamics describes quarks and gluons.",
        "Paris is the capital of France.",
    ]
    router = BM25Router().fit(keys)
    route = router.route(
        ["What is the capital of France?", "Which particles are quarks bound by?", "xyzzy"], k=3
    )
    assert route.indices[0, 0] == 2 and route.indices[1, 0] == 1
    assert route.scores[0, 0] > 0 and route.scores[0, 1] == 0
    # No indexed word: every unit scores 0 and ties go to unit order.
    np.testing.assert_array_equal(route.indices[2], [0, 1, 2])
    np.testing.assert_array_equal(route.scores[2], [0, 0, 0])
    # Stopwords: with them kept, "the" matches unit 0 (twice) and unit 2.
    kept = BM25Router(stopwords=None).fit(keys).route(["the"], k=1)
    assert kept.indices[0, 0] == 0 and kept.scores[0, 0] > 0


def test_document_scope_only_returns_units_of_the_question_document():
    keys = ["apples and oranges", "bananas", "apples oranges pears", "grapes", "melons"]
    docs = ["a", "a", "b", "b", "b"]
    question = ["apples oranges pears"]
    assert BM25Router().fit(keys).route(question, k=1).indices[0, 0] == 2  # globally: doc b
    scoped = BM25Router(scope="document").fit(keys, key_docs=docs)
    assert scoped.route(question, k=1, question_docs=["a"]).indices[0, 0] == 0
    # Every question, every rank, stays within its document.
    keys8, questions, _ = phonebook_sectors()
    docs8 = [s % 3 for s in range(8)]
    rng = np.random.default_rng(0)
    qdocs = rng.integers(0, 3, len(questions)).tolist()
    route = BM25Router(scope="document").fit(keys8, docs8).route(questions, 2, question_docs=qdocs)
    assert all(docs8[u] == d for row, d in zip(route.indices, qdocs, strict=True) for u in row)
    assert np.isfinite(route.scores).all()
    with pytest.raises(RouterError, match=r"document 'a' .* has 2 units, fewer than k=3"):
        scoped.route(question, k=3, question_docs=["a"])


def test_oracle_and_routing_accuracy():
    route = OracleRouter().fit(["x", "y", "z"]).route(["q0", "q1"], 1, question_units=[2, 0])
    np.testing.assert_array_equal(route.indices, [[2], [0]])
    assert routing_accuracy(route, [2, 0]) == {"top1": 1.0, "recall@1": 1.0}
    made = Route(np.array([[0, 1], [2, 0], [1, 2]]), np.zeros((3, 2), np.float32))
    # float fractions of 3 questions: approx's default relative 1e-6 is rounding only
    assert routing_accuracy(made, [0, 0, 0]) == pytest.approx({"top1": 1 / 3, "recall@2": 2 / 3})


BAD = {
    "unknown kind": (lambda: make_router("nope"), "unknown router 'nope'"),
    "unknown option": (lambda: make_router("bm25", foo=1), "unknown option"),
    "missing encoder": (lambda: make_router("embedding"), "needs option"),
    "unknown pooling": (lambda: EmbeddingRouter("tiny-llama", pooling="max"), "unknown pooling"),
    "bm25 ngrams": (lambda: BM25Router(ngrams=3), "ngrams must be 1 or 2"),
    "unknown scope": (lambda: BM25Router(scope="world"), "unknown routing scope"),
    "no keys": (lambda: BM25Router().fit([]), "has no keys"),
    "empty key": (lambda: BM25Router().fit(["a b", " "]), "key 1 is empty"),
    "stopword key": (lambda: BM25Router().fit(["cats", "the of"]), "key 1 has no words"),
    "not fitted": (lambda: BM25Router().route(["q"], 1), "call fit"),
    "k zero": (lambda: BM25Router().fit(["cat"]).route(["q"], 0), "positive integer"),
    "k too large": (lambda: BM25Router().fit(["cat", "dog"]).route(["q"], 3), "larger than"),
    "empty question": (lambda: BM25Router().fit(["cat"]).route([""], 1), "question 0 is empty"),
    "oracle k": (
        lambda: OracleRouter().fit(["a", "b"]).route(["q"], 2, question_units=[0]),
        "k must be 1",
    ),
    "oracle units": (lambda: OracleRouter().fit(["a"]).route(["q"], 1), "needs question_units"),
    "oracle range": (
        lambda: OracleRouter().fit(["a"]).route(["q"], 1, question_units=[3]),
        "must lie in",
    ),
    "key docs": (lambda: BM25Router(scope="document").fit(["cat"]), "needs key_docs"),
    "question docs": (
        lambda: BM25Router(scope="document").fit(["cat"], ["d"]).route(["q"], 1),
        "needs question_docs",
    ),
    "unknown doc": (
        lambda: (
            BM25Router(scope="document").fit(["cat"], ["d"]).route(["q"], 1, question_docs=["e"])
        ),
        "has 0 units",
    ),
    "accuracy shape": (
        lambda: routing_accuracy(Route(np.zeros((2, 1), int), np.zeros((2, 1))), [0]),
        "one unit per routed question",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_give_one_line_errors(case):
    call, match = BAD[case]
    with pytest.raises(RouterError, match=match) as err:
        call()
    assert isinstance(err.value, JaxloraError)
    assert "\n" not in str(err.value)
