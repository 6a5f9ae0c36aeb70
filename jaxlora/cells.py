"""The cells of a job: each adapter's plan (LoRA config, optimizer numbers, objective, seeds),
the units a corpus expands into, the data each adapter trains on, and the groups adapters are
stacked in. Pure planning and host-side data: `jaxlora.sweep` runs it.

Independence of cells: an adapter's initial weights derive from (training.seed, its `lora`
settings), its data order from (training.seed, its `data` settings) and its dropout masks
from both, never from its position in the grid. A one-cell config with the same values
therefore reproduces that cell of a grid job, and cells that share settings share random
numbers (a rank sweep sees identical batches in identical order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlora import data as kdata
from jaxlora.config import Cell, Config, DistillSection
from jaxlora.data.stream import pack, packed_length
from jaxlora.errors import ConfigError, DataError
from jaxlora.lora import Layout, LoRAConfig, layout_groups
from jaxlora.models.attention import PACK_CHUNK
from jaxlora.models.config import ModelConfig
from jaxlora.objectives import Distill


def stable_seed(*parts: Any) -> int:
    """A 62-bit seed from JSON-serialisable parts, identical on every machine and process."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 2


# LoRA settings added after adapters' seeds were first derived from the `lora:` section, with
# the value that section held implicitly before: at that value they stay out of the hash, so
# a config that does not use them trains the same adapters as before they existed.
LATER_LORA_FIELDS = {"use_dora": False, "lr_ratio": 1.0}


def _seed_fields(section: Any) -> dict[str, Any]:
    """The `lora:` fields an adapter's seeds hash (`LATER_LORA_FIELDS` only where set)."""
    fields = dataclasses.asdict(section)
    return {
        k: v for k, v in fields.items() if k not in LATER_LORA_FIELDS or v != LATER_LORA_FIELDS[k]
    }


def seed_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed & 0x7FFFFFFF), (seed >> 31) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class CellPlan:
    """One adapter of the job: its cell, LoRA config, optimizer numbers, objective and seeds."""

    index: int
    cell: Cell
    lora: LoRAConfig
    hyper: dict[str, float]
    init_seed: int
    data_seed: int
    dropout_seed: int
    objective: Distill | None = None  # None: next-token prediction

    @property
    def name(self) -> str:
        return self.cell.name


def plan_cells(config: Config, model_config: ModelConfig) -> list[CellPlan]:
    plans = []
    for i, cell in enumerate(config.cells()):
        c = cell.config
        lora = LoRAConfig(
            rank=c.lora.rank,
            alpha=c.lora.alpha,
            targets=c.lora.targets if isinstance(c.lora.targets, str) else tuple(c.lora.targets),
            layers=None if c.lora.layers is None else tuple(c.lora.layers),
            dropout=c.lora.dropout,
            use_rslora=c.lora.use_rslora,
            init=c.lora.init,
            use_dora=c.lora.use_dora,
        ).validate(model_config)
        t = c.training
        hyper = dict(
            lr=t.lr,
            warmup_ratio=t.warmup_ratio,
            weight_decay=t.weight_decay,
            clip_norm=math.inf if t.clip_norm is None else t.clip_norm,
            b1=t.adam_b1,
            b2=t.adam_b2,
            eps=t.adam_eps,
            lr_ratio=c.lora.lr_ratio,
        )
        lora_d, data_d = _seed_fields(c.lora), dataclasses.asdict(c.data)
        objective = None
        if t.objective == "distill":
            objective = Distill.from_section(c.distill or DistillSection(), model_config.num_layers)
        plans.append(
            CellPlan(
                index=i,
                cell=cell,
                lora=lora,
                hyper=hyper,
                init_seed=stable_seed(t.seed, "init", lora_d),
                data_seed=stable_seed(t.seed, "data-order", data_d),
                dropout_seed=stable_seed(t.seed, "dropout", lora_d, data_d),
                objective=objective,
            )
        )
    return plans


# `adapters_per_pass: auto` on a CPU: adapters per pass whose batches make about this many token
# positions. Measured (benchmarks/README.md): at 448-512 positions per adapter, 2-4 adapters
# per pass were faster per step than 1 per pass and than all at once.
CPU_POSITIONS_PER_PASS = 1024


def resolve_per_pass(setting: int | str | None, platform: str, positions: int) -> int | None:
    """`training.adapters_per_pass` for a backend, given the token positions of one adapter's
    batch (batch x width, or the packed length). `auto` on a CPU takes as many adapters per pass
    as make about `CPU_POSITIONS_PER_PASS` positions (at least 1): enough rows for the matmuls
    to run near their rate, few enough that a pass's activations stay in cache. On GPU/TPU it
    is all at once (None), where one adapter's batch leaves most of the chip idle."""
    if setting == "auto":
        return max(1, CPU_POSITIONS_PER_PASS // positions) if platform == "cpu" else None
    return setting


def count_passes(local: int, per_pass: int | None) -> int:
    """Sequential passes over a device's `local` adapters of a group: the fewest that keep each
    pass within `per_pass` (None: all at once) and divide the adapters evenly."""
    if per_pass is None or per_pass >= local:
        return 1
    return next(n for n in range(-(-local // per_pass), local + 1) if local % n == 0)


def expand_units(config: Config, tokenizer) -> tuple[Config, list[kdata.Unit]]:
    """`data.units` as the last (fastest) sweep axis `data.unit`: one adapter per unit for every
    other cell. Returns the expanded config and the units (none when `data.units` is none).

    A config that already names its unit(s) (`data.unit`, or `data.unit` in the sweep) is
    returned as it is, so expanding twice changes nothing."""
    d = config.data
    if d.units == "none":
        return config, []
    if tokenizer is None:
        raise ConfigError("data.units needs a tokenizer: add tokenizer files to model.path")
    per_data: dict[str, list[kdata.Unit]] = {}
    for cell in config.cells():
        data = dataclasses.replace(cell.config.data, unit=None)
        key = json.dumps(dataclasses.asdict(data), sort_keys=True)
        if key not in per_data:
            per_data[key] = kdata.load_units(data, tokenizer)
    unit_lists = list(per_data.values())
    ids = [u.id for u in unit_lists[0]]
    if any([u.id for u in other] != ids for other in unit_lists[1:]):
        raise ConfigError(
            f"{config.source}: the sweep changes the corpus's units (data.units: {d.units}); "
            "sweep only keys that keep the same units, or run one job per corpus"
        )
    if d.unit is not None or any(key == "data.unit" for key, _ in config.sweep):
        chosen = {d.unit} if d.unit is not None else set()
        chosen |= {v for key, values in config.sweep if key == "data.unit" for v in values}
        return config, [u for u in unit_lists[0] if u.id in chosen]
    return config.with_value("sweep.data.unit", ids), unit_lists[0]


# ---------------------------------------------------------------------------------------------
# data


class JobData:
    """Records and encodings of each cell, built lazily (a process encodes only its adapters)."""

    def __init__(
        self,
        plans: Sequence[CellPlan],
        tokenizer,
        batch_size: int,
        vocab_size: int | None = None,
    ):
        if tokenizer is None:
            raise ConfigError(
                "model.path has no tokenizer; training needs one "
                "(add tokenizer files to the model directory)"
            )
        self.plans, self.tokenizer, self.batch_size = plans, tokenizer, batch_size
        self.vocab_size = vocab_size  # the model's embedding rows: every token id must fit
        self._records: dict[Any, list] = {}
        self._units: dict[str, dict[str, kdata.Unit]] = {}
        self._encoded: dict[int, kdata.Encoded] = {}
        self._contexts: dict[int, list[int]] = {}
        self._teacher: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.width = 0
        self.longest = 0  # the longest row of any cell: how far packed attention looks back
        self.packed_length = 0  # positions of a packed step (0: not computed)
        self.context_width = 0  # the longest teacher context of a distilling cell
        self.context_offset = 0  # 1: samples begin with BOS, which the context's BOS replaces

    def _corpus_units(self, data) -> dict[str, kdata.Unit]:
        """The units of a data section's corpus, by id (every unit comes from one split)."""
        corpus = dataclasses.replace(data, unit=None)
        key = json.dumps(dataclasses.asdict(corpus), sort_keys=True)
        if key not in self._units:
            self._units[key] = {u.id: u for u in kdata.load_units(corpus, self.tokenizer)}
        return self._units[key]

    def records(self, plan: CellPlan) -> list:
        data = plan.cell.config.data
        if data.unit is not None:
            units = self._corpus_units(data)
            if data.unit not in units:
                return kdata.load_records(data, self.tokenizer)  # raises, naming the units
            return list(units[data.unit].records)
        key = json.dumps(dataclasses.asdict(data), sort_keys=True)
        if key not in self._records:
            self._records[key] = kdata.load_records(plan.cell.config.data, self.tokenizer)
        return self._records[key]

    def encoded(self, plan: CellPlan) -> kdata.Encoded:
        if plan.index not in self._encoded:
            d = plan.cell.config.data
            self._encoded[plan.index] = kdata.encode(
                self.records(plan),
                self.tokenizer,
                chat_template=d.chat_template,
                loss_mask=d.loss_mask,
                max_length=d.max_length,
                vocab_size=self.vocab_size,
            )
        return self._encoded[plan.index]

    def context(self, plan: CellPlan) -> list[int]:
        """The teacher's context of a distilling cell, BOS excluded: its unit's text as
        `data.format: text` trains it (the document or chunk, behind any ID header; a unit
        trained on synthesised formats is read from its corpus as text) and a blank line."""
        if plan.index not in self._contexts:
            data = plan.cell.config.data
            if kdata.is_document_dataset(data) and (data.format != "text" or data.train_path):
                data = dataclasses.replace(data, format="text", train_path=None)
            unit = self._corpus_units(data).get(data.unit)
            if unit is None:
                raise DataError(
                    f"adapter {plan.name}: unit {data.unit!r} has no document in "
                    f"{data.dataset} to put before its samples; distillation needs each unit's "
                    "text (train it with training.objective: ntp)"
                )
            ids = list(self.tokenizer(unit.text + "\n\n", add_special_tokens=False)["input_ids"])
            if self.vocab_size is not None:
                kdata.check_vocab(ids, self.tokenizer, self.vocab_size, f"unit {unit.id}'s text")
            self._contexts[plan.index] = ids
        return self._contexts[plan.index]

    def _starts_with_bos(self, plan: CellPlan) -> tuple[bool, bool]:
        """(some, all) of the cell's samples begin with the tokenizer's BOS."""
        bos = self.tokenizer.bos_token_id
        first = self.encoded(plan).tokens[:, 0]
        hits = bos is not None and first == bos
        return bool(np.any(hits)), bool(np.all(hits))

    def prepare(self, indices: Sequence[int]) -> None:
        """Encode the given cells and agree across processes on one sequence width, the longest
        row, the length of a packed step (the B longest rows of any cell together), and for
        distilling cells the context width and whether samples begin with BOS."""
        encoded = [self.encoded(self.plans[i]) for i in indices]
        distilled = [self.plans[i] for i in indices if self.plans[i].objective is not None]
        bos = [self._starts_with_bos(p) for p in distilled]
        local = np.asarray(
            [
                max((e.tokens.shape[1] for e in encoded), default=0),
                max((int(e.lengths.max()) for e in encoded), default=0),
                max(
                    (packed_length(e.lengths, self.batch_size, PACK_CHUNK) for e in encoded),
                    default=0,
                ),
                max((len(self.context(p)) for p in distilled), default=0),
                any(some for some, _ in bos),
                any(not every for _, every in bos),
            ],
            np.int32,
        )
        agreed = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 6).max(0)
        self.width, self.longest, self.packed_length = (int(x) for x in agreed[:3])
        some_bos, not_all_bos = bool(agreed[4]), bool(agreed[5])
        if some_bos and not_all_bos:
            raise DataError(
                "distillation needs every sample to begin with the tokenizer's BOS or none to "
                "(the teacher's context takes its place); the data mixes both: check "
                "data.chat_template and the chat template's BOS"
            )
        self.context_offset = int(some_bos)
        self.context_width = int(agreed[3]) + self.context_offset

    def cache_teacher(self, plan: CellPlan, compute) -> None:
        """Keep the teacher's outputs for every sample of a distilling cell (host memory):
        `compute(tokens, valid, context, context_valid)` -> (logits [B, T, V], hidden
        [K, B, T, D] or None) on the samples `batch_size` rows at a time."""
        encoded = self.encoded(plan)
        n, B = len(encoded), self.batch_size
        context = self.context_batch(plan)
        logits, hidden = [], []
        for start in range(0, n, B):
            rows = np.arange(start, start + B)
            tokens, valid, _ = self._padded(encoded, np.where(rows < n, rows, -1))
            out = jax.device_get(compute(tokens, valid, *context))
            logits.append(out[0][: n - start])
            if out[1] is not None:
                hidden.append(np.swapaxes(out[1], 0, 1)[: n - start])  # [B, K, T, D]
        self._teacher[plan.index] = (
            np.concatenate(logits),
            np.concatenate(hidden) if hidden else None,
        )

    @property
    def teacher_cache_bytes(self) -> int:
        """Host memory the cached teacher outputs take in this process."""
        return sum(x.nbytes for out in self._teacher.values() for x in out if x is not None)

    def teacher_batch(self, plan: CellPlan, step: int) -> tuple[np.ndarray, ...]:
        """The cached teacher outputs of `batch(plan, step)`'s rows: logits [B, T, V] and, with
        an L1 term, hidden states [B, K, T, D]; zeros for empty rows (no position counts)."""
        idx = self.stream(plan).indices(step)
        out = []
        for cached in self._teacher[plan.index]:
            if cached is not None:
                rows = cached[np.where(idx < 0, 0, idx)]
                rows[idx < 0] = 0
                out.append(rows)
        return tuple(out)

    def context_batch(self, plan: CellPlan) -> tuple[np.ndarray, np.ndarray]:
        """(ids, valid) [context_width]: BOS (when samples begin with it) and the context,
        left-padded so that it ends right before the sample."""
        ids = [self.tokenizer.bos_token_id] * self.context_offset + self.context(plan)
        pad = self.context_width - len(ids)
        tokens = np.asarray([self.encoded(plan).pad_id] * pad + ids, np.int32)
        return tokens, np.arange(self.context_width) >= pad

    def stream(self, plan: CellPlan) -> kdata.EpochStream:
        return kdata.EpochStream(len(self.encoded(plan).tokens), self.batch_size, plan.data_seed)

    def batch(self, plan: CellPlan, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._padded(self.encoded(plan), self.stream(plan).indices(step))

    def _padded(self, encoded: kdata.Encoded, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """(tokens, valid, loss) of `rows` (-1: an empty row), padded to the job's width."""
        tokens, valid, loss = kdata.gather(encoded, rows)
        pad = self.width - tokens.shape[1]
        if pad:
            tokens = np.pad(tokens, ((0, 0), (0, pad)), constant_values=encoded.pad_id)
            valid, loss = (np.pad(x, ((0, 0), (0, pad))) for x in (valid, loss))
        return tokens, valid, loss

    def packed_batch(self, plan: CellPlan, step: int) -> tuple[np.ndarray, ...]:
        """The rows of `batch` laid end to end: (tokens, valid, loss, segment ids) [1, L]."""
        pad_id = self.encoded(plan).pad_id
        return pack(*self.batch(plan, step), self.packed_length, pad_id)


# ---------------------------------------------------------------------------------------------
# the job


@dataclasses.dataclass
class Group:
    """Slots of one stack: plan indices, None for inert padding slots."""

    slots: list[int | None]

    @property
    def real(self) -> list[tuple[int, int]]:
        return [(slot, i) for slot, i in enumerate(self.slots) if i is not None]


def build_groups(plans: Sequence[CellPlan], layout: Layout, adapter_devices: int) -> list[Group]:
    """Stacks of adapters: one per objective (settings are static in the step), split by the
    resolved layout (`groups`: one per rank; `padded`; rank ceilings), each padded to a multiple
    of the adapter devices."""
    by_objective: dict[Distill | None, list[int]] = {}
    for i, p in enumerate(plans):
        by_objective.setdefault(p.objective, []).append(i)
    groups = []
    for indices in by_objective.values():
        for members in layout_groups([plans[i].lora for i in indices], layout):
            pad = -len(members) % adapter_devices
            groups.append(Group([indices[m] for m in members] + [None] * pad))
    return groups
