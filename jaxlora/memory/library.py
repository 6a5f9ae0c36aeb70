"""A trained run as adapter libraries, and the questions asked of them.

A run whose data was cut into units (`data.units`) is an adapter *library*: one adapter per
unit, plus `units.jsonl` (each unit's key, text, document and questions). When the grid has
other axes (units x ranks), each combination of them is its own library (`load_libraries`),
labelled by those values as key=value (`library_label`: `objective=ntp`, `rank=8,objective=ntp`),
or by its units (`units=sectors`) when it is the run's only library: a label is never empty.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxlora import data as kdata
from jaxlora.errors import DataError
from jaxlora.evaluate import load_stacks
from jaxlora.job import Job
from jaxlora.lora import AdapterStack, concatenate
from jaxlora.memory.validate import read_units


@dataclasses.dataclass(frozen=True)
class Library:
    """One library: adapters in unit order (a stack) and their units' ids, documents, keys and
    texts. `label` names the other sweep values it was trained with as key=value, or its units
    (`units=sectors`) when there are none (`library_label`)."""

    label: str
    stack: AdapterStack
    units: tuple[str, ...]
    documents: tuple[str, ...]
    keys: tuple[str, ...]
    texts: tuple[str, ...]
    questions: tuple[tuple[kdata.Record, ...], ...]  # each unit's own questions
    # The other sweep values, (dotted key, value): columns of the results, so reports can
    # group libraries (e.g. data.format: the training format x metric table).
    values: tuple[tuple[str, Any], ...] = ()

    def __len__(self) -> int:
        return len(self.units)


@dataclasses.dataclass(frozen=True)
class MemoryQuestion:
    record: kdata.Record  # what is asked (its question) and the answer
    unit: int | None  # index of its own unit in the library; None when unknown
    document: str | None
    source: Any = None  # the EvalQuestion of a document dataset (references, level, options)

    @property
    def query(self) -> str:
        """What routers search with: the bare question (no paper ID, no options)."""
        return self.source.query if self.source is not None else self.record.question


def load_libraries(job: Job, run_dir: Path) -> list[Library]:
    """The libraries of a finished run with units (see the module docstring)."""
    path = run_dir / "units.jsonl"
    if not path.exists():
        raise DataError(
            f"{run_dir} has no units.jsonl: memory evaluation needs a run trained with "
            "data.units (sectors, documents, chunks or files)"
        )
    rows = read_units(path)  # every row checked before any adapter is loaded
    stacks = load_stacks(job, run_dir)
    by_name = {}
    for g, stack in zip(job.groups, stacks, strict=True):
        for slot, i in g.real:
            by_name[job.plans[i].name] = (stack, slot)
    groups: dict[str, list] = {}
    for plan in job.plans:
        others = [(k, v) for k, v in plan.cell.values if k != "data.unit"]
        label = library_label(others, job.config.data.units)
        groups.setdefault(label, []).append(plan)
    libraries = []
    for label, plans in groups.items():
        missing = [p.name for p in plans if p.name not in rows]
        if missing:
            raise DataError(f"{path} has no row for adapter {missing[0]}: retrain the run")
        parts = [by_name[p.name][0].select([by_name[p.name][1]]) for p in plans]
        meta = [rows[p.name] for p in plans]
        libraries.append(
            Library(
                label=label,
                stack=concatenate(job.model, parts),
                units=tuple(m["unit"] for m in meta),
                documents=tuple(m["document"] for m in meta),
                keys=tuple(m["key"] for m in meta),
                texts=tuple(m["text"] for m in meta),
                questions=tuple(
                    tuple(
                        kdata.Record("qa", question=q["question"], answer=q["answer"])
                        for q in m["questions"]
                    )
                    for m in meta
                ),
                values=tuple((k, _plain(v)) for k, v in plans[0].cell.values if k != "data.unit"),
            )
        )
    return libraries


def library_label(values, units: str | None) -> str:
    """A library's label: its other sweep values as key=value joined by ",", each key by its last
    part unless two share it (`objective=ntp`, `rank=8,objective=ntp`, `lora.alpha=8,data.alpha=2`),
    or `units=...` for a run's only library (never "": the `library` column always names one)."""
    if not values:
        return f"units={units}"
    short = [k.rpartition(".")[2] for k, _ in values]
    return ",".join(
        f"{s if short.count(s) == 1 else k}={_plain(v)}"
        for (k, v), s in zip(values, short, strict=True)
    )


def legacy_label(values) -> str:
    """The label a library had before key=value (`rank8-objectiventp`, "" for a run's only one),
    so that a result set written then is relabelled, not duplicated (`ResultSet.relabel`)."""
    return "-".join(f"{k.rpartition('.')[2]}{_plain(v)}" for k, v in values)


def _plain(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
