"""Hand-checked cases for the study's scoring rules (jaxlora.eval.metrics)."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from jaxlora.errors import DataError
from jaxlora.eval import metrics
from jaxlora.eval.metrics import (
    bleu,
    efficacy,
    exact_match,
    extract_phone,
    first_target_token,
    phonebook_correct,
    rouge_l,
    summarize,
    target_token_context,
)

# ----------------------------------------------------------------------------- PhoneBook


@pytest.mark.parametrize(
    "text, expected",
    [
        ("603-556-7631", "603-556-7631"),
        ("The phone number of Mary Smith is 603-556-7631.", "603-556-7631"),
        ("Answer: 603-556-7631 or maybe 212-555-0100", "603-556-7631"),  # first one counts
        ("no number here", None),
        ("", None),
        ("603.556.7631", None),  # the study's regex requires dashes
        ("(603) 556-7631", None),
        ("6035567631", None),
        ("603-556-763", None),  # too short
        ("12603-556-76319", "603-556-7631"),  # no word boundaries in the study's regex
    ],
)
def test_extract_phone(text, expected):
    assert extract_phone(text) == expected


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("603-556-7631", "603-556-7631", True),
        ("Sure! It is 603-556-7631, call anytime.", "603-556-7631", True),
        ("603-556-7631", "603-556-7632", False),
        ("212-555-0100 then 603-556-7631", "603-556-7631", False),  # only the first counts
        ("603-556-7631 then 212-555-0100", "603-556-7631", True),
        ("603.556.7631", "603-556-7631", False),  # right digits, wrong separators: no match
        ("603-556-7631", "(603) 556 7631", True),  # digits compared, not strings
        ("603-556-7631", "6035567631", True),
        ("I don't know.", "603-556-7631", False),
        ("", "603-556-7631", False),
    ],
)
def test_phonebook_correct(prediction, answer, expected):
    assert phonebook_correct(prediction, answer) is expected


def test_phonebook_answer_without_digits_is_a_data_error():
    with pytest.raises(DataError, match="no digits"):
        phonebook_correct("603-556-7631", "unknown")


# ----------------------------------------------------------------------------- generic


def test_exact_match():
    assert exact_match("  Paris\n", "paris")
    assert exact_match("New   York  City", "new york city")
    assert exact_match("STRASSE", "straße")  # casefold, not lower
    assert not exact_match("Paris", "Paris, France")
    assert not exact_match(" Paris", "Paris", normalize=False)
    assert exact_match("Paris", "Paris", normalize=False)
    assert exact_match("", "   ")


def test_summarize():
    assert summarize([True, False, True, True]) == {"mean": 0.75, "n": 4}
    assert summarize([0.5, 1.0]) == {"mean": 0.75, "n": 2}
    assert summarize([]) == {"mean": None, "n": 0}


# ----------------------------------------------------------------------------- CounterFact


def test_efficacy_orders_and_ties():
    assert efficacy(-0.5, -2.0) is True
    assert efficacy(-2.0, -0.5) is False
    assert efficacy(-1.0, -1.0) is False  # a tie is not a success
    assert efficacy(float("nan"), -1.0) is False


@pytest.fixture(scope="module")
def tok():
    from jaxlora.models.tokenizer import train_tokenizer

    return train_tokenizer("llama", 512)


PROMPT = "The president of the company is"


def test_leading_space_token_differs_from_study_variant(tok):
    # " William" is one merged token in the test vocabulary; "William" alone is not.
    spaced = first_target_token(tok, PROMPT, "William")
    alone = first_target_token(tok, PROMPT, "William", leading_space=False)
    assert spaced != alone
    assert tok.decode([spaced]) == " William"
    assert tok.decode([spaced]).startswith(" W")
    assert tok.decode([alone]) == "W"
    assert alone == tok("William", add_special_tokens=False)["input_ids"][0]
    # The leading-space token is what the model sees after the prompt in the training text.
    full = tok(PROMPT + " William", add_special_tokens=False)["input_ids"]
    context, target_id = target_token_context(tok, PROMPT, "William")
    assert full[: len(context) + 1] == [*context, target_id]
    assert context == tok(PROMPT, add_special_tokens=False)["input_ids"]


def test_separate_space_token_stays_in_context(tok):
    # This small vocabulary has no " I…" merge: " Italian" is "Ġ" + "I" + …, so the target's
    # first token is "I" and the lone space token belongs to the context the model conditions on.
    context, target_id = target_token_context(tok, PROMPT, "Italian")
    assert tok.convert_ids_to_tokens([context[-1]]) == ["Ġ"]
    assert tok.decode([target_id]) == "I"
    assert [*context, target_id] == tok(PROMPT + " I", add_special_tokens=False)["input_ids"]
    assert first_target_token(tok, PROMPT, "Italian", leading_space=False) == target_id


def test_study_variant_context_is_the_prompt_alone(tok):
    context, target_id = target_token_context(tok, PROMPT, "William", leading_space=False)
    assert context == tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert tok.decode([target_id]) == "W"


def test_empty_target_is_a_data_error(tok):
    with pytest.raises(DataError, match="empty CounterFact target"):
        first_target_token(tok, PROMPT, "  ")


# ----------------------------------------------------------------------------- BLEU / ROUGE-L


def test_bleu_identical_and_disjoint():
    # exp of a sum of log(1) terms times 100: float rounding only
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert bleu("a dog ran home", "the cat sat on the mat") == 0.0
    assert bleu("", "the cat sat on the mat") == 0.0


def test_bleu_partial_by_hand_and_against_corpus_bleu():
    pred = "the quick brown fox jumps over the dog"
    ref = "the quick brown fox jumped over the lazy dog"
    # Modified n-gram precisions 7/8, 4/7, 2/6, 1/5; brevity penalty exp(1 - 9/8).
    by_hand = (
        100
        * math.exp(1 - 9 / 8)
        * math.exp((math.log(7 / 8) + math.log(4 / 7) + math.log(2 / 6) + math.log(1 / 5)) / 4)
    )
    # float64 both ways, the same terms in another order: 1e-9 relative is rounding only
    assert bleu(pred, ref) == pytest.approx(by_hand, rel=1e-9)
    # Every order has a match, so smoothing does not enter and sentence == corpus BLEU.
    assert bleu(pred, ref) == pytest.approx(sacrebleu.corpus_bleu([pred], [[ref]]).score)


def test_rouge_l_with_stemming_by_hand():
    # Stemmed tokens: pred [the, cat, is, run], ref [the, cat, run]: LCS = 3.
    p, r = 3 / 4, 3 / 3
    assert rouge_l("the cat is running", "the cats run") == pytest.approx(2 * p * r / (p + r))
    # Without stemming only "the" would match; "runs"/"run" share the stem too.
    assert rouge_l("runs", "run") == pytest.approx(1.0)
    assert rouge_l("The Cat", "the cat") == pytest.approx(1.0)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("dog", "the cat") == 0.0


def test_rouge_scorer_is_built_once():
    assert metrics._rouge_scorer() is metrics._rouge_scorer()


# ----------------------------------------------------------------------------- ROUGE, references


def test_rouge_multi_is_rouge_score_best_of_references():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=True)
    cases = [
        ("the fox lived in a wood", ["In a wood.", "a small wood near the river"]),
        ("He ran home.\nThen he slept.", ["he slept", "He ran to his home and then slept."]),
        ("", ["anything"]),
        ("Bob", ["bob", "BOB"]),
    ]
    for prediction, refs in cases:
        got = metrics.rouge_multi(prediction, refs)
        # the F-measures rouge_score computes, in floats: approx's default 1e-6 is rounding
        assert got == pytest.approx(
            {k: s.fmeasure for k, s in scorer.score_multi(refs, prediction).items()}
        )
        # best over references, chosen per ROUGE type
        for k in metrics.ROUGE_TYPES:
            best = max(scorer.score(r, prediction)[k].fmeasure for r in refs)
            # as above: the same F-measure, rounding only
            assert got[k] == pytest.approx(best)


def test_rouge_multi_by_hand_and_per_type_choice():
    # rouge1 prefers the first reference, rouge2 the second: each type takes its own best.
    pred = "cat dog bird"
    got = metrics.rouge_multi(pred, ["bird dog cat", "cat dog fish fish fish"])
    assert got["rouge1"] == pytest.approx(1.0)  # all three unigrams of the first
    p, r = 1 / 2, 1 / 4  # bigram "cat dog" of the second: 1 of 2 predicted, 1 of 4 reference
    assert got["rouge2"] == pytest.approx(2 * p * r / (p + r))
    assert metrics.rouge_multi("runs", ["run"])["rouge1"] == 1.0  # stemmed by default
    assert metrics.rouge_multi("runs", ["run"], use_stemmer=False)["rouge1"] == 0.0
    with pytest.raises(DataError, match="list of reference answers"):
        metrics.rouge_multi("x", "x")  # type: ignore[arg-type]


def test_mean_per_document_weights_documents_equally():
    scores = [{"rougeL": 1.0}, {"rougeL": 0.0}, {"rougeL": 0.0}, {"rougeL": 0.5}]
    docs = ["a", "b", "b", "b"]
    got = metrics.mean_per_document(scores, docs)
    assert got["rougeL"] == pytest.approx((1.0 + 0.5 / 3) / 2)  # not the flat mean 0.375
    assert (got["n"], got["n_documents"]) == (4, 2)
    assert metrics.mean_by([1, 2, 3], ["x", "y", "x"]) == {"x": 2.0, "y": 2.0}
    with pytest.raises(DataError, match="one per question"):
        metrics.mean_per_document(scores, docs[:2])


def test_per_level_breakdown():
    scores = [
        {"bleu": 10.0, "rouge_l": 0.2},
        {"bleu": 30.0, "rouge_l": 0.4},
        {"bleu": 5.0, "rouge_l": 0.0},
    ]
    table = metrics.per_level(scores, [1, 1, 3])
    # (0.2 + 0.4) / 2 in floats is not 0.3 to the bit: approx's default relative 1e-6
    assert table["level_1"] == {"bleu": 20.0, "rouge_l": pytest.approx(0.3), "n": 2}
    assert table["level_2"] == {"bleu": None, "rouge_l": None, "n": 0}
    assert table["level_3"] == {"bleu": 5.0, "rouge_l": 0.0, "n": 1}
    # a float mean: approx's default relative 1e-6 is rounding only
    assert table["all"]["bleu"] == pytest.approx(15.0) and table["all"]["n"] == 3
    with pytest.raises(DataError, match="level 0 is not one of 1, 2, 3"):
        metrics.per_level(scores, [1, 0, 3])


# ----------------------------------------------------------------------------- QuALITY


@pytest.mark.parametrize(
    "output, expected",
    [
        ("C", "C"),
        ("C.", "C"),
        (" (B)", "B"),
        ("[D]", "D"),
        ("A) The crew", "A"),
        ("(C) The crew came back changed.", "C"),
        ("D - Jupiter", "D"),
        ("Answer: C", "C"),
        ("answer: B", "B"),
        ("The answer is: (D)", "D"),
        ("The correct answer is C", "C"),
        ("The correct answer is C because the crew changed.", "C"),
        ("Certainly! The correct option is B.", "B"),
        ("**B**", "B"),
        ("Option D", "D"),
        ("answer choice (A)", "A"),
        ("\\boxed{C}", "C"),
        ("Sure.\nC", "C"),
        ("B\n\nOption A is wrong because...", "B"),  # a later mention is not an answer
        ("A. Mars", "A"),
        # nothing stated
        ("Certainly", None),
        ("The correct…", None),  # the study's parser read C here
        ("The correct", None),
        ("Cats can't fly.", None),
        ("A man walked in.", None),  # an article, not an option
        ("Answer: Certainly", None),
        ("Bob", None),
        ("I think it is B", None),  # no answer cue: strict
        ("b", None),
        ("E", None),  # not one of four options
        ("C.S. Lewis", None),
        ("The answer is not C", None),
        ("", None),
        # ambiguous
        ("A or B", None),
        ("(A) or (C)", None),
        ("C/D", None),
        ("A, B", None),
        ("A. Actually, the answer is B.", None),
    ],
)
def test_parse_choice(output, expected):
    assert metrics.parse_choice(output) == expected


def test_parse_choice_option_count():
    assert metrics.parse_choice("E", n_options=5) == "E"
    assert metrics.parse_choice("D", n_options=3) is None
    with pytest.raises(DataError, match="n_options"):
        metrics.parse_choice("A", n_options=1)


def test_loglik_choice():
    assert metrics.loglik_choice([-5.0, -1.5, -3.0, -9.0]) == 1
    # Length-normalised: option 0 is longer but likelier per token.
    assert metrics.loglik_choice([-6.0, -4.0], lengths=[6, 2]) == 0
    assert metrics.loglik_choice([float("nan"), -3.0, -2.0, float("-inf")]) == 2
    assert metrics.loglik_choice([-1.0, -1.0, -4.0]) is None  # an exact tie decides nothing
    assert metrics.loglik_choice([float("nan"), float("-inf")]) is None
    with pytest.raises(DataError, match="one score per option"):
        metrics.loglik_choice([-1.0])
    with pytest.raises(DataError, match="positive length"):
        metrics.loglik_choice([-1.0, -2.0], lengths=[1, 0])


def test_choice_accuracy_with_hard_subset_and_unanswered():
    outputs = ["C", "Certainly", "The answer is A", "(B)", "A or B"]
    predicted = [metrics.parse_choice(o) for o in outputs]
    gold = [2, 1, "A", 3, 0]
    hard = [True, True, False, True, False]
    got = metrics.choice_accuracy(predicted, gold, hard)
    assert got == {
        # float quotients: approx's default relative 1e-6; one answer more or less is >= 1/5
        "accuracy": pytest.approx(2 / 5),
        "n": 5,
        "unanswered": 2,
        # as accuracy: a float quotient
        "hard_accuracy": pytest.approx(1 / 3),
        "n_hard": 3,
    }
    assert metrics.choice_accuracy([1, 0], [1, 1]) == {"accuracy": 0.5, "n": 2, "unanswered": 0}
    with pytest.raises(DataError, match="one entry per question"):
        metrics.choice_accuracy([1], [1, 2])
