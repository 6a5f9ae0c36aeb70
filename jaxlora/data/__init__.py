"""Knowledge data: records, readers, budgets, encoding and data order.

The pipeline for one adapter:

    records = load_records(cfg.data, tokenizer)        # read or generate, cut to the budget
    enc = encode(records, tokenizer, chat_template=..., loss_mask=..., max_length=...)
    stream = EpochStream(len(enc), batch_size, seed)   # shuffled epochs, stateless
    tokens, valid, loss = gather(enc, stream.indices(step))

Each stage is a plain function of its inputs, so every adapter of a stacked job can have its
own dataset, budget and order, and a resumed job sees exactly the batches it would have seen.
"""

from __future__ import annotations

from jaxlora.data.budget import check_budget_args, count_tokens, take_budget
from jaxlora.data.docsets import (
    DOCUMENT_DATASETS,
    DocumentSet,
    ask_record,
    budgeted,
    is_document_dataset,
    load_document_set,
    load_questions,
)
from jaxlora.data.encode import LOSS_MASKS, Encoded, LossMask, check_vocab, encode
from jaxlora.data.phonebook import (
    PHONE_PATTERN,
    generate_phonebook,
    phonebook_record,
    phonebook_records,
)
from jaxlora.data.readers import DATASET_KINDS, read_records, read_table
from jaxlora.data.records import RECORD_KINDS, Record, RecordKind, row_record
from jaxlora.data.stream import EpochStream, gather
from jaxlora.data.units import UNIT_KINDS, Unit
from jaxlora.errors import DataError

__all__ = [
    "DATASET_KINDS",
    "DOCUMENT_DATASETS",
    "LOSS_MASKS",
    "PHONE_PATTERN",
    "RECORD_KINDS",
    "UNIT_KINDS",
    "DocumentSet",
    "Encoded",
    "EpochStream",
    "LossMask",
    "Record",
    "RecordKind",
    "Unit",
    "ask_record",
    "check_vocab",
    "count_tokens",
    "encode",
    "gather",
    "generate_phonebook",
    "is_document_dataset",
    "load_document_set",
    "load_questions",
    "load_records",
    "load_units",
    "phonebook_record",
    "phonebook_records",
    "read_records",
    "read_table",
    "row_record",
    "take_budget",
]


def load_records(data, tokenizer) -> list[Record]:
    """The budgeted records of a config's data section (one unit's, when `data.unit` is set).

    `data` is a `DataSection` or anything with its attributes. A PhoneBook without a path is
    generated from `seed`; every other dataset needs `path`.
    """
    if data.units != "none" and data.unit is not None:
        units = {u.id: u for u in load_units(data, tokenizer)}
        if data.unit not in units:
            raise DataError(
                f"data.unit={data.unit!r} is not a unit of this corpus; its units are "
                f"{_listing(list(units))}"
            )
        return list(units[data.unit].records)
    return _corpus(data, tokenizer, data.document_field)


def load_units(data, tokenizer) -> list[Unit]:
    """Every unit of a data section with `data.units` set (see `jaxlora/data/units.py`)."""
    from jaxlora.data import units

    def read(path, document_field):
        return _read(data, path, document_field)

    if data.units == "files" or data.path is not None:
        return units.load_units(data, tokenizer, read)
    # A generated phonebook: budgeted at generation, then split.
    return units.split(_corpus(data, tokenizer, None), data, tokenizer)


def _corpus(data, tokenizer, document_field) -> list[Record]:
    kind = data.dataset
    if kind not in DATASET_KINDS + DOCUMENT_DATASETS:
        kinds = DATASET_KINDS + DOCUMENT_DATASETS
        raise DataError(f"unknown data.dataset {kind!r}: use one of {', '.join(kinds)}")
    check_budget_args(data.size_tokens, data.size_rows)
    if kind in DOCUMENT_DATASETS and data.path is None:  # generated (jaxlora.data.docsets)
        return budgeted(list(load_document_set(data).records), data, tokenizer)
    if data.path is None or str(data.path) == "":
        if kind != "phonebook":
            raise DataError(f"data.path is required for dataset '{kind}'")
        seed = 0 if data.seed is None else int(data.seed)
        return phonebook_records(
            tokenizer, size_tokens=data.size_tokens, size_rows=data.size_rows, seed=seed
        )
    return budgeted(_read(data, data.path, document_field), data, tokenizer)


def _read(data, path, document_field) -> list[Record]:
    if is_document_dataset(data):  # the reader names each record's document itself
        return list(load_document_set(data).records)
    return read_records(
        data.dataset,
        path,
        text_field=data.text_field,
        question_field=data.question_field,
        answer_field=data.answer_field,
        document_field=document_field,
    )


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
