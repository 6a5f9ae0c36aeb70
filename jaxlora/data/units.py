"""Units of a memory: a corpus cut into pieces, one adapter per piece.

The study's memory experiments train one adapter per *unit* of knowledge: a contiguous sector
of a phonebook, a paper, a chunk of a book. A unit is a cell like any other (docs/design.md §2), so
`expand_units` turns `data.units` into one more sweep axis, `data.unit`, varying fastest:
units x ranks is one grid, trained in one job.

The budget (`data.size_tokens` / `size_rows`) cuts the *corpus*; units split what it kept.
Kinds (`data.units`):

- `sectors`: contiguous runs of records, either `unit_count` sectors of about equal token
  counts (PhoneBook 128K -> 16 x ~8K) or sectors of at most `unit_tokens` tokens each.
- `documents`: one unit per document (`data.document_field`, or each row of a `text` dataset).
- `chunks`: windows of `unit_tokens` tokens overlapping by `unit_overlap`, in the model's
  tokens, within each document; every token is covered and a document shorter than a window is
  one chunk. Chunk `j` of document `DOC` is unit `DOC.j` (zero-padded to the document's chunk
  count). Records `jaxlora synth` wrote per chunk (`UnitRecord`s: their `unit_id` names a
  chunk) are not cut: the windows are cut from the documents and each chunk trains on its own
  records only (`synth_chunks`), its passage being its key and its text.
- `files`: `data.path` is a glob, one unit per file (the study's `_sector_XX.csv`).

Each unit has a *key*: the text routers search. By default its content; `data.unit_keys` names
a file of `{unit, key}` rows (summaries, as the study used for NarrativeQA and QuALITY).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxlora.data.budget import count_tokens
from jaxlora.data.docsets import budgeted, load_document_set, synth_source
from jaxlora.data.records import Record, UnitRecord, unit_name
from jaxlora.errors import DataError

log = logging.getLogger(__name__)

UNIT_KINDS: tuple[str, ...] = ("none", "sectors", "documents", "chunks", "files")
SECTORS_DOCUMENT = "corpus"  # sectors cut one running corpus: they share one document


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit: its id (file-name safe), its document, its training records and its key;
    `source` the text its records were synthesised from (a chunk's passage), when they were."""

    id: str
    document: str
    records: tuple[Record, ...]
    key: str
    source: str = ""

    @property
    def text(self) -> str:
        """The unit's content: what ICL and RAG put in context."""
        return self.source or content(self.records)

    @property
    def questions(self) -> list[Record]:
        """The unit's own records that can be asked (a known answer)."""
        return [r for r in self.records if r.kind != "text" and r.answer]


def content(records: Sequence[Record]) -> str:
    return "\n".join(r.knowledge_text for r in records)


def text_hash(text: str) -> str:
    """A unit text's fingerprint: synth records carry it, so that a chunk cut otherwise (other
    unit_tokens, unit_overlap or tokenizer) is told apart from the one they were written from."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows of `size` over n tokens, consecutive ones sharing exactly
    `overlap` tokens; the last window ends at n, so every token is covered."""
    if size <= 0 or not 0 <= overlap < size:
        raise DataError(
            f"chunks need data.unit_tokens > data.unit_overlap >= 0; got {size} and {overlap}"
        )
    starts = [0]
    while starts[-1] + size < n:
        starts.append(starts[-1] + size - overlap)
    return [(s, min(s + size, n)) for s in starts]


def sectors(
    records: Sequence[Record], tokenizer, *, count: int | None, tokens: int | None
) -> list[Unit]:
    """Contiguous sectors: `count` of about equal tokens, or greedy runs of <= `tokens`."""
    sizes = count_tokens(records, tokenizer)
    total = np.cumsum(sizes)
    if count is not None:
        if count > len(records):
            raise DataError(
                f"data.unit_count={count} sectors but the corpus has only {len(records)} "
                "records: lower data.unit_count or raise the data budget"
            )
        # Cut where the running token count reaches k/count of the total, keeping at least one
        # record in every sector.
        bounds, n = [0], len(records)
        for k in range(1, count):
            cut = int(np.searchsorted(total, total[-1] * k / count, side="left")) + 1
            bounds.append(min(max(cut, bounds[-1] + 1), n - (count - k)))
        bounds.append(n)
    else:
        assert tokens is not None
        if int(sizes.max()) > tokens:
            raise DataError(
                f"a record has {int(sizes.max())} tokens, more than data.unit_tokens={tokens}: "
                "raise data.unit_tokens"
            )
        bounds, used = [0], 0
        for i, n in enumerate(sizes.tolist()):
            if used + n > tokens:
                bounds.append(i)
                used = 0
            used += n
        bounds.append(len(records))
    width = len(str(len(bounds) - 2))
    return [
        _unit(f"{k:0{width}d}", SECTORS_DOCUMENT, records[a:b])
        for k, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def documents(records: Sequence[Record]) -> list[Unit]:
    """One unit per document, in order of first appearance."""
    return [_unit(unit_name(doc), doc, rows) for doc, rows in _by_document(records).items()]


def chunks(records: Sequence[Record], tokenizer, *, size: int, overlap: int) -> list[Unit]:
    """Token windows within each document; a chunk is a `text` record of its window."""
    units = []
    for doc, rows in _by_document(records).items():
        text = "\n\n".join(r.knowledge_text for r in rows)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        if not spans:
            raise DataError(f"document {doc!r} has no tokens: remove it or fill it in")
        cut = windows(len(spans), size, overlap)
        width = len(str(len(cut) - 1))
        for j, (a, b) in enumerate(cut):
            piece = text[spans[a][0] : spans[b - 1][1]]
            units.append(_unit(f"{unit_name(doc)}.{j:0{width}d}", doc, [Record("text", piece)]))
    return units


def synth_chunks(records: Sequence[Record], data, tokenizer) -> list[Unit]:
    """Chunks of the documents of `records`, each with the records `jaxlora synth` wrote for
    it (`UnitRecord`s from `data.train_path`). A record of a whole document, a unit id that is
    no chunk of this cut, a chunk settings mismatch with the synth run (its report, or the text
    a record was written from) and a chunk without records are errors, never a misassignment."""
    where = f"data.train_path {data.train_path} ({data.format})"
    size, overlap = data.unit_tokens, data.unit_overlap
    mine = [r for r in records if isinstance(r, UnitRecord)]
    whole = [r.document for r in records if not isinstance(r, UnitRecord)]
    if whole:
        raise DataError(
            f"{where} has records of a whole document ({whole[0]!r}; {len(whole)} in all), but "
            "data.units: chunks trains one adapter per chunk: synthesize over this run's chunks "
            "(jaxlora synth with this run config as its units), or use data.units: documents"
        )
    source = synth_source(data.train_path)
    made = ""
    if source.get("units") == "chunks":
        made = (
            f"; jaxlora synth cut unit_tokens={source.get('unit_tokens')}, unit_overlap="
            f"{source.get('unit_overlap')} with {source.get('model')} ({source.get('config')})"
        )
        if (source.get("unit_tokens"), source.get("unit_overlap")) != (size, overlap):
            raise DataError(
                f"{where} was synthesized over other chunks than this run cuts (data.unit_tokens="
                f"{size}, data.unit_overlap={overlap}{made}): use the same chunk settings, or "
                "rerun jaxlora synth with this run's config"
            )
    own: dict[str, list[UnitRecord]] = {}
    for r in mine:
        own.setdefault(r.unit, []).append(r)
    present = dict.fromkeys(r.document for r in mine)
    documents = [d for d in load_document_set(data).documents if d.document in present]
    cut = chunks(documents, tokenizer, size=size, overlap=overlap)
    ids = {u.id for u in cut}
    for uid, rows in own.items():
        if uid not in ids:
            its = [u.id for u in cut if u.document == rows[0].document]
            raise DataError(
                f"{where}: unit_id {uid!r} is not a chunk of document {rows[0].document!r} cut by "
                f"data.unit_tokens={size}, data.unit_overlap={overlap} (its chunks: {its[0]} to "
                f"{its[-1]}{made}): rerun jaxlora synth with this run's config"
            )
    units, missing = [], []
    for u in cut:
        rows = own.get(u.id)
        if not rows:
            missing.append(u.id)
            continue
        if any(r.unit_hash not in (None, text_hash(u.text)) for r in rows):
            raise DataError(
                f"{where}: the records of unit {u.id!r} were written from other text than this "
                f"run's chunk {u.id} (another unit_tokens, unit_overlap, tokenizer or document "
                f"text{made}): rerun jaxlora synth with this run's config"
            )
        units.append(Unit(u.id, u.document, tuple(rows), u.text, source=u.text))
    if missing:
        raise DataError(
            f"{where}: {len(missing)} of {len(cut)} chunks have no records (first: "
            f"{missing[0]!r}; synth_report.json says what came short, a data budget cuts records "
            "and the leakage guard may drop them): rerun jaxlora synth or keep the budget null"
        )
    return units


def split(records: Sequence[Record], data, tokenizer) -> list[Unit]:
    """The units of a budgeted corpus under a config's data section."""
    if data.units == "sectors":
        units = sectors(records, tokenizer, count=data.unit_count, tokens=data.unit_tokens)
    elif data.units in ("documents", "files"):
        units = documents(records)
    elif data.units == "chunks" and any(isinstance(r, UnitRecord) for r in records):
        units = synth_chunks(records, data, tokenizer)
    elif data.units == "chunks":
        units = chunks(records, tokenizer, size=data.unit_tokens, overlap=data.unit_overlap)
    else:
        raise DataError(f"unknown data.units {data.units!r}: use one of {', '.join(UNIT_KINDS)}")
    seen: dict[str, str] = {}
    for u in units:
        if u.id in seen:
            raise DataError(
                f"documents {seen[u.id]!r} and {u.document!r} both become unit {u.id!r}: "
                "rename one (unit ids keep letters, digits, '.', '_' and '-')"
            )
        seen[u.id] = u.document
    if data.unit_keys:
        units = with_keys(units, data.unit_keys)
    return units


def load_units(data, tokenizer, read) -> list[Unit]:
    """All units of a data section; `read(path, document_field)` reads one file's records."""
    if data.units == "files":
        files = sorted(glob.glob(str(Path(data.path).expanduser())))
        if not files:
            raise DataError(
                f"data.path {data.path!r} matches no file: with data.units: files it is a glob "
                "such as data/phonebook_sector_*.csv"
            )
        stems = [Path(f).stem for f in files]
        records = [
            dataclasses.replace(r, document=stem)
            for f, stem in zip(files, stems, strict=True)
            for r in read(f, None)
        ]
    else:
        records = read(data.path, data.document_field)
        unnamed = any(r.document is None for r in records)  # document datasets name them
        if data.units in ("documents", "chunks") and data.document_field is None and unnamed:
            if any(r.kind != "text" for r in records):
                raise DataError(
                    f"data.units: {data.units} needs data.document_field (the column naming "
                    "each row's document), or a text dataset whose rows are the documents"
                )
            records = [dataclasses.replace(r, document=str(i)) for i, r in enumerate(records)]
    kept = budgeted(records, data, tokenizer)  # data.document_tokens, then the budget
    if len(kept) < len(records):  # never silent: a budget that drops documents says so
        log.warning(
            "the data budget (size_tokens=%s, size_rows=%s) keeps %d of %d records (%d of %d "
            "documents); set data.size_tokens: null for the whole corpus",
            data.size_tokens,
            data.size_rows,
            len(kept),
            len(records),
            len({r.document for r in kept}),
            len({r.document for r in records}),
        )
    return split(kept, data, tokenizer)


def with_keys(units: Sequence[Unit], path: str | Path) -> list[Unit]:
    """Units whose keys are read from a json/jsonl/csv file of `unit` and `key` columns."""
    from jaxlora.data.readers import read_table

    table = read_table(path)
    ids, keys = table.strings("unit", "data.unit_keys"), table.strings("key", "data.unit_keys")
    given = dict(zip(ids, keys, strict=True))
    missing = [u.id for u in units if u.id not in given]
    if missing:
        raise DataError(
            f"data.unit_keys {path} has no key for unit {missing[0]!r} "
            f"({len(missing)} of {len(units)} missing): add a row for every unit"
        )
    extra = sorted(set(given) - {u.id for u in units})
    if extra:
        raise DataError(
            f"data.unit_keys {path} names unit {extra[0]!r}, which the corpus does not have: "
            "unit ids are listed in the run's units.jsonl"
        )
    return [dataclasses.replace(u, key=given[u.id]) for u in units]


def _by_document(records: Sequence[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for r in records:
        if r.document is None:
            raise DataError("a record has no document: set data.document_field")
        groups.setdefault(r.document, []).append(r)
    return groups


def _unit(uid: str, document: str, records: Sequence[Record]) -> Unit:
    records = tuple(records)
    return Unit(uid, document, records, content(records))
