"""Generated document corpora: small fictional PaperQA, NarrativeQA and QuALITY sets whose
questions the documents answer, so the document pipeline runs with nothing downloaded (the
tiny twins in CI, `data.path: null`) and a real model can be measured on knowledge it cannot
have seen (docs/findings.md).

- `generate_paperqa`: papers in the paperQA.json layout, 6 evaluation questions each;
  `generate_paperqa_training`: 8 training QA per paper that teach the same facts and ask them
  differently, the role of the study's synthetic training sets.
- `generate_narrativeqa`, `generate_quality`: stories in the hub schemas of
  `deepmind/narrativeqa` and `emozilla/quality`; `write_generated` writes them as jsonl.

Every generator is deterministic in its `seed`.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from jaxlora.data.records import Record
from jaxlora.errors import DataError

GENERATED_PAPERS = 6

__all__ = [
    "GENERATED_PAPERS",
    "generate_narrativeqa",
    "generate_paperqa",
    "generate_paperqa_training",
    "generate_quality",
    "write_generated",
]

_SYLLABLES = ("bra", "ke", "lo", "mi", "nu", "qua", "ri", "sto", "tel", "vex", "zor", "dan")
_TASKS = (
    "protein folding",
    "weather forecasting",
    "code repair",
    "robot grasping",
    "speech translation",
    "graph matching",
    "music tagging",
    "crop mapping",
)
_METRICS = ("error", "latency", "memory use", "training cost", "variance", "energy use")
_MECHANISMS = (
    "sparse attention",
    "contrastive pretraining",
    "learned routing",
    "curriculum sampling",
    "spectral pruning",
    "tree search",
    "low-rank updates",
    "energy matching",
)
_BENCHMARKS = ("Orion", "Tundra", "Marlin", "Cobalt", "Juniper", "Sable", "Quartz", "Heron")


@dataclasses.dataclass(frozen=True)
class _Paper:
    """The facts of one generated paper: what its introduction states and its questions ask."""

    id: int
    name: str
    task: str
    mechanism: str
    benchmark: str
    metric: str
    percent: int


def _papers(n_papers: int, seed: int) -> list[_Paper]:
    if not 1 <= n_papers <= len(_TASKS):
        raise DataError(f"the generated PaperQA corpus has 1-{len(_TASKS)} papers; got {n_papers}")
    rng = random.Random(seed)
    tasks, mechs, benches = (rng.sample(xs, n_papers) for xs in (_TASKS, _MECHANISMS, _BENCHMARKS))
    names: list[str] = []
    while len(names) < n_papers:
        name = "".join(rng.sample(_SYLLABLES, 3)).capitalize()
        if name not in names:
            names.append(name)
    papers = []
    for i in range(n_papers):
        metric, pct = rng.choice(_METRICS), rng.randrange(12, 61)
        papers.append(_Paper(i, names[i], tasks[i], mechs[i], benches[i], metric, pct))
    return papers


def generate_paperqa(n_papers: int = GENERATED_PAPERS, seed: int = 0) -> list[dict[str, Any]]:
    """A small corpus in the paperQA.json layout: `n_papers` fictional papers, each a short
    introduction and 6 questions (2 per level: recall, comprehension, logical structure) whose
    answers the introduction states. Deterministic in `seed`; names differ between papers."""
    out = []
    for p in _papers(n_papers, seed):
        m, task, mech, bench = p.name, p.task, p.mechanism, p.benchmark
        intro = (
            f"We introduce {m}, a method for {task}. {m} lowers {p.metric} by {p.percent} percent "
            f"on the {bench} benchmark. Unlike earlier systems, {m} is built on {mech}. Our "
            f"analysis shows that {mech} is what makes {task} reliable."
        )
        qa = [
            (1, f"Which task is {m} designed for?", f"{m} is designed for {task}."),
            (1, f"On which benchmark was {m} evaluated?", f"On the {bench} benchmark."),
            (2, f"How much does {m} lower {p.metric}?", f"By {p.percent} percent."),
            (2, f"What is {m} built on?", f"{m} is built on {mech}."),
            (3, f"How does {m} differ from earlier systems?", f"It is built on {mech}."),
            (3, f"Why is {task} reliable with {m}?", f"Because of {mech}."),
        ]
        out.append(
            {
                "id": p.id,
                "title": f"{m}: {mech} for {task}",
                "conference": "generated",
                "introduction": intro,
                "QA": [{"level": lv, "question": q, "answer": a} for lv, q, a in qa],
            }
        )
    return out


def generate_paperqa_training(n_papers: int = GENERATED_PAPERS, seed: int = 0) -> list[Record]:
    """Training QA for the papers of `generate_paperqa(n_papers, seed)`, as the study's
    synthetic training sets are to its introductions: 8 questions per paper that teach the
    facts its introduction states, each asked differently from every evaluation question (the
    leakage guard passes them), answered in a sentence that names the paper's method. What a
    format comparison trains without an LLM writing the QA (`data.format: qa` or `text_qa`
    with `data.path: null`)."""
    records = []
    for p in _papers(n_papers, seed):
        m, task, mech, bench = p.name, p.task, p.mechanism, p.benchmark
        qa = [
            (f"What problem does {m} address?", f"{m} addresses {task}."),
            (f"What is {m}?", f"{m} is a method for {task}, built on {mech}."),
            (f"Where was {m} tested?", f"{m} was tested on the {bench} benchmark."),
            (
                f"What result does {m} report on {bench}?",
                f"{m} lowers {p.metric} by {p.percent} percent on the {bench} benchmark.",
            ),
            (
                f"By what percentage is {p.metric} reduced with {m}?",
                f"{m} reduces {p.metric} by {p.percent} percent.",
            ),
            (f"Which technique does {m} rely on?", f"{m} relies on {mech}."),
            (f"Which idea sets {m} apart from earlier systems?", f"{m} uses {mech}."),
            (
                f"According to the authors of {m}, what makes {task} dependable?",
                f"{mech.capitalize()}, on which {m} is built.",
            ),
        ]
        records += [Record("qa", question=q, answer=a, document=str(p.id)) for q, a in qa]
    return records


# ----------------------------------------------------------------------------- generated stories

_NAMES = ("Tolo", "Mera", "Ansel", "Brisa", "Corin", "Dalia", "Evander", "Fenna", "Galen", "Hesper")
_PLACES = ("the salt marsh", "the glass tower", "the river mill", "the northern islands",
           "the copper mine", "the orchard", "the lighthouse", "the mountain pass")  # fmt: skip
_THINGS = ("a brass key", "a blue lantern", "a map of the coast", "a sack of rye",
           "a silver bell", "a wooden flute", "a jar of honey", "a broken compass")  # fmt: skip
_ANIMALS = ("a grey fox", "an old heron", "a lame horse", "a black cat", "a young goat")
_COUNTS = ("three", "four", "five", "seven", "nine", "twelve")


def _story(rng: random.Random, i: int) -> tuple[str, str, list[tuple[str, str, list[str]]]]:
    """A fictional story (a title, paragraphs of plain prose) and its facts as (question,
    short answer, distractors): what both generated datasets ask."""
    hero, friend = rng.sample(_NAMES, 2)
    home, goal = rng.sample(_PLACES, 2)
    thing, gift = rng.sample(_THINGS, 2)
    animal, count = rng.choice(_ANIMALS), rng.choice(_COUNTS)
    title = f"The Tale of {hero} {i}"
    text = "\n\n".join(
        [
            f"{hero} lived at {home} with {animal}. Every morning {hero} walked along the water "
            f"and counted the boats, and every evening {hero} wrote the count in a book.",
            f"One winter {friend} arrived from {goal} carrying {thing}. {friend} said that the "
            f"road to {goal} was closed by snow and that {count} travellers were lost on it.",
            f"{hero} and {friend} set out together. They walked for {count} days, sheltered in "
            f"a barn, and shared {gift} with a shepherd who showed them the hidden path.",
            f"At {goal} they found the travellers alive. {hero} gave {thing} to the oldest of "
            f"them, and {friend} stayed at {goal} to rebuild the road when spring came.",
        ]
    )
    others = [x for x in _NAMES if x not in (hero, friend)]
    facts = [
        (f"Where did {hero} live?", home, [p for p in _PLACES if p not in (home, goal)]),
        (f"What did {friend} carry from {goal}?", thing, [t for t in _THINGS if t != thing]),
        (f"How many days did {hero} and {friend} walk?", count, [c for c in _COUNTS if c != count]),
        (f"Who stayed at {goal} to rebuild the road?", friend, others),
        (f"What did {hero} share with the shepherd?", gift, [t for t in _THINGS if t != gift]),
    ]
    return title, text, facts


def generate_narrativeqa(n_books: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Rows in the `deepmind/narrativeqa` schema: `n_books` fictional Gutenberg-kind stories
    (~170 words each) and 5 questions per story with two reference answers each (the short
    answer and a sentence). Deterministic in `seed`."""
    if not 1 <= n_books <= 8:
        raise DataError(f"the generated NarrativeQA set has 1-8 books; got {n_books}")
    rng = random.Random(seed)
    rows = []
    for b in range(n_books):
        title, text, facts = _story(rng, b)
        doc = {
            "id": f"gen{b}", "kind": "gutenberg", "url": f"generated://{b}",
            "file_size": len(text), "word_count": len(text.split()), "start": "", "end": "",
            "summary": {"text": "", "tokens": [], "url": "", "title": title},
            "text": text,
        }  # fmt: skip
        for q, a, _ in facts:
            refs = [a, f"It was {a}."]
            rows.append(
                {
                    "document": doc,
                    "question": {"text": q, "tokens": q.split()},
                    "answers": [{"text": r, "tokens": r.split()} for r in refs],
                }
            )
    return rows


def generate_quality(n_articles: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Rows in the `emozilla/quality` schema: `n_articles` fictional stories and 5
    four-option questions each (0-based `answer` at a random position; every other
    question `hard`). Deterministic in `seed`."""
    if not 1 <= n_articles <= 8:
        raise DataError(f"the generated QuALITY set has 1-8 articles; got {n_articles}")
    rng = random.Random(seed)
    rows = []
    for a in range(n_articles):
        _, text, facts = _story(rng, a)
        for j, (q, answer, distractors) in enumerate(facts):
            options = rng.sample(distractors, 3)
            gold = rng.randrange(4)
            options.insert(gold, answer)
            rows.append(
                {
                    "article": text,
                    "question": q,
                    "options": options,
                    "answer": gold,
                    "hard": j % 2 == 1,
                }
            )
    return rows


def write_generated(dataset: str, path: str | Path, seed: int = 0) -> Path:
    """Write the generated NarrativeQA or QuALITY rows as jsonl (the readers take it as a
    local file in the hub schema); returns the path."""
    generators = {"narrativeqa": generate_narrativeqa, "quality": generate_quality}
    if dataset not in generators:
        raise DataError(f"no generated set for {dataset!r}: use narrativeqa or quality")
    path = Path(path)
    rows = generators[dataset](seed=seed)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path
