"""The tables a training run writes beside its adapters and checkpoints, from process 0 once
training has finished (`jaxlora.sweep.SweepJob`):

- `train_summary.csv`: one row per adapter, in grid order: its sweep values, rank, token
  budget, rows, trainable parameters, final loss and whether it diverged.
- `units.jsonl` (a run with units): per adapter, its unit, document, key text and own
  questions: all that routers and the memory evaluator need besides the adapters.
- document datasets: `questions.jsonl` (the evaluation questions, each with its document) and
  `leakage.json` (per data variant of the grid: what the leakage guard found and dropped), so
  a run says what it was asked and what it was not trained on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlora import data as kdata
from jaxlora.cells import CellPlan
from jaxlora.data.documents import write_questions
from jaxlora.data.units import Unit
from jaxlora.fsutil import atomic_write
from jaxlora.models.config import ModelConfig


def summary_row(
    plan: CellPlan,
    n_rows: int,
    losses: dict[str, float],
    diverged_at: int,
    model_config: ModelConfig,
    steps: int,
) -> dict[str, Any]:
    """One adapter's row of train_summary.csv (`index` orders the rows and is not written)."""
    c = plan.cell.config
    return {
        "index": plan.index,
        "name": plan.name,
        **{k: _csv_value(v) for k, v in plan.cell.values},
        "rank": plan.lora.rank,
        "size_tokens": c.data.size_tokens,
        "n_rows": n_rows,
        "trainable_params": plan.lora.num_params(model_config),
        "steps": steps,
        "final_loss": losses.get(plan.name, float("nan")),
        "status": "diverged" if diverged_at >= 0 else "ok",
        "diverged_at_step": diverged_at if diverged_at >= 0 else "",
    }


def write_summary(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    fields = [k for k in rows[0] if k != "index"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "train_summary.csv", buf.getvalue())


def write_units(run_dir: Path, plans: Sequence[CellPlan], units: Sequence[Unit]) -> None:
    """units.jsonl: per adapter, its unit, document, key text and own questions."""
    by_id = {u.id: u for u in units}
    lines = []
    for plan in plans:
        u = by_id[plan.cell.config.data.unit]
        questions = [{"question": r.question, "answer": r.answer} for r in u.questions]
        row = {"adapter": plan.name, "unit": u.id, "document": u.document, "key": u.key}
        row["text"] = u.text
        lines.append(json.dumps({**row, "questions": questions}, ensure_ascii=False))
    atomic_write(run_dir / "units.jsonl", "\n".join(lines) + "\n")


def write_documents(run_dir: Path, plans: Sequence[CellPlan]) -> None:
    """questions.jsonl and leakage.json of a document dataset; nothing for other datasets."""
    reports, questions = {}, None
    for plan in plans:
        data = dataclasses.replace(plan.cell.config.data, unit=None)
        if not kdata.is_document_dataset(data):
            return
        docset = kdata.load_document_set(data)
        questions = questions or docset.questions
        reports.setdefault(json.dumps(docset.leakage_report(data)), None)
    write_questions(run_dir / "questions.jsonl", questions or ())
    report = [json.loads(r) for r in reports]
    atomic_write(run_dir / "leakage.json", json.dumps(report, indent=1) + "\n")


def _csv_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return v
