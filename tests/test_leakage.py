"""The leakage guard (jaxlora.data.leakage): planted evaluation questions are caught, exact and
paraphrased; same-topic text and questions are not flagged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jaxlora.data.documents import EvalQuestion, read_paperqa, read_paperqa_training
from jaxlora.data.leakage import find_leaks, guard, normalize_words, similarity
from jaxlora.data.records import Record, row_record
from jaxlora.errors import DataError

SHARED = Path(
    os.environ.get("JAXLORA_STUDY_DATA", Path(__file__).resolve().parents[2] / "shared/data")
)

QUESTIONS = [
    EvalQuestion(
        "p0.03",
        "p0",
        "[Paper ID: 0] What is the name of the diffusion-based planner cited as an example "
        "from Janner et al. (2022)?",
        ("Diffuser.",),
        query="What is the name of the diffusion-based planner cited as an example from "
        "Janner et al. (2022)?",
    ),
    EvalQuestion(
        "p0.07",
        "p0",
        "How does tree search balance exploration and exploitation in the planner?",
        ("By meta-actions.",),
    ),
    EvalQuestion("p0.09", "p0", "Who wrote it?", ("Janner.",)),
]

INTRO = (
    "Diffusion models have recently emerged as a powerful approach to planning. Diffusion-based "
    "planners, such as Diffuser (Janner et al., 2022), generate whole trajectories. Tree search "
    "balances exploration and exploitation; we use guidance levels as meta-actions in the "
    "planner. Who wrote it? Nobody knows."
)
SAME_TOPIC_QA = [
    Record("qa", question="[Paper ID: 0] What are diffusion models used for in planning?",
           answer="Generating trajectories.", document="p0"),
    Record("qa", question="What is the main advantage of diffusion-based planners over "
           "autoregressive ones?", answer="Holistic generation.", document="p0"),
    Record("qa", question="Which planner did Janner et al. (2022) propose, and how does it "
           "model trajectories?", answer="Diffuser, by denoising.", document="p0"),
    Record("qa", question="How do guidance levels act as meta-actions in tree search?",
           answer="They trade exploration for exploitation.", document="p0"),
]  # fmt: skip


def test_unrelated_same_topic_data_is_not_flagged():
    records = [Record("text", INTRO, document="p0"), *SAME_TOPIC_QA]
    assert find_leaks(records, QUESTIONS) == []
    assert guard(records, QUESTIONS).records == records


def test_exact_plant_is_an_error_naming_record_and_question():
    planted = Record(
        "qa",
        question="[Paper ID: 0] What is the name of the diffusion-based planner cited as an "
        "example from Janner et al. (2022)?",  # the study's prefix, same question
        answer="Diffuser.",
    )
    records = [*SAME_TOPIC_QA, planted]
    with pytest.raises(DataError) as e:
        guard(records, QUESTIONS)
    msg = str(e.value)
    assert "\n" not in msg
    assert "training record 4" in msg and "evaluation question p0.03" in msg
    assert "exact" in msg and "data.leakage: drop" in msg


@pytest.mark.parametrize(
    "paraphrase",
    [
        # two words changed
        "What is the name of the diffusion based planner given as an example by Janner et al. 2022?",
        # a word dropped and one replaced
        "What's the name of the diffusion-based planner cited as example from Janner et al.?",
        # one word inserted, one replaced
        "How does the tree search balance exploration and exploitation within the planner?",
    ],
)
def test_paraphrased_plant_is_caught(paraphrase):
    records = [*SAME_TOPIC_QA, Record("qa", question=paraphrase, answer="x")]
    (hit,) = find_leaks(records, QUESTIONS)
    assert hit.record == 4 and hit.kind == "near" and 0.8 <= hit.similarity < 1.0


def test_plants_inside_texts_and_rows_are_caught():
    question = QUESTIONS[1].question
    in_text = Record("text", f"{INTRO} Q: {question} A: by meta-actions.")
    no_mark = Record("text", f"Notes. {question.rstrip('?').lower()} is answered below. More.")
    paraphrased = Record("text", "Quiz. How does the tree search balance exploration and "
                         "exploitation within the planner? Think.")  # fmt: skip
    row = row_record(f"Question: {question}", "By meta-actions.")
    hits = find_leaks([in_text, no_mark, paraphrased, row], QUESTIONS)
    assert [(h.record, h.question, h.kind) for h in hits] == [
        (0, "p0.07", "exact"),
        (1, "p0.07", "exact"),  # a contiguous run without the question mark
        (2, "p0.07", "near"),
        (3, "p0.07", "exact"),
    ]


def test_short_questions_count_only_when_asked_exactly():
    # "Who wrote it?" occurs in the intro's prose and as a near variant: neither is a leak;
    # the same question as a training question is.
    records = [
        Record("text", INTRO),
        Record("qa", question="Who wrote this?", answer="x"),
        Record("qa", question="Who wrote it?", answer="x"),
    ]
    assert [(h.record, h.kind) for h in find_leaks(records, QUESTIONS)] == [(2, "exact")]


def test_drop_policy_keeps_the_rest_and_counts():
    planted = Record("qa", question=QUESTIONS[1].question, answer="x")
    also = Record("text", f"{QUESTIONS[0].query} {QUESTIONS[1].question}")
    records = [SAME_TOPIC_QA[0], planted, SAME_TOPIC_QA[1], also]
    result = guard(records, QUESTIONS, policy="drop")
    assert result.records == [SAME_TOPIC_QA[0], SAME_TOPIC_QA[1]]
    assert result.dropped == 2
    assert sorted((h.record, h.question) for h in result.hits) == [
        (1, "p0.07"),
        (3, "p0.03"),
        (3, "p0.07"),
    ]


def test_plain_strings_and_bad_settings():
    hits = find_leaks([Record("qa", question="q: how do planners search trees?", answer="x")],
                      ["How do planners search trees?"], min_words=3)  # fmt: skip
    assert [(h.question, h.kind) for h in hits] == [("0", "exact")]
    with pytest.raises(DataError, match=r"unknown data\.leakage 'warn'"):
        guard([], QUESTIONS, policy="warn")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="threshold must lie in"):
        find_leaks([], QUESTIONS, threshold=0.0)


def test_normalisation_and_similarity():
    assert normalize_words("[Paper ID: 3] What's new?") == ("what", "s", "new")
    assert normalize_words("In the Paper ID 3, What is X?") == ("what", "is", "x")
    assert normalize_words("Question: [Paper ID: 3] Ｘ-ray") == ("x", "ray")  # NFKC
    a = ("what", "is", "the", "name", "of", "the", "planner")
    assert similarity(a, a) == 1.0
    b = ("what", "is", "the", "goal", "of", "the", "planner")
    # a float quotient: approx's 1e-6 relative is rounding; one word more or less is 1/7
    assert similarity(a, b) == pytest.approx(6 / 7)
    assert similarity(a, []) == 0.0


@pytest.mark.skipif(not (SHARED / "paperqa_train").is_dir(), reason="../shared/data absent")
def test_study_paperqa_training_sets():
    corpus = read_paperqa(SHARED / "paper_dataset" / "paperQA.json")
    intros = read_paperqa_training(SHARED / "paperqa_train" / "individual_introductions_bracket")
    qa = read_paperqa_training(SHARED / "paperqa_train" / "concatenated_qa_bracket.jsonl")
    # The introductions the questions were written from are not leaks.
    assert find_leaks(intros, corpus.questions) == []
    # The study's synthetic QA restate some evaluation questions almost word for word.
    hits = find_leaks(qa, corpus.questions)
    by_question = {h.question: qa[h.record].question for h in hits}
    assert "[Paper ID: 4] What is the goal of the study described in the text?" in (
        by_question.values()
    )
    assert 0 < len(hits) < 30
    kept = guard(qa, corpus.questions, policy="drop")
    assert len(kept.records) == len(qa) - kept.dropped
