"""The sections of a run config (`model`, `lora`, `data`, `training`, `distill`, `mesh`,
`checkpoint`, `eval`, `memory`, `llm`): their fields, defaults and checks.

Each section is a `Section` (jaxlora/config/schema.py): a field's type hint and `rule` are
its whole specification, and rules that involve several fields of one section are in its
`_check`, so an invalid section cannot be built, by a file or by `dataclasses.replace`. Rules
that involve several sections are `Config`'s (jaxlora/config/grid.py). Every key is documented
in configs/README.md, and docs/config.md is generated from these classes (their docstrings, and
the comments above and beside each field: jaxlora/config/reference.py).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import field
from typing import Any, ClassVar, Literal

from jaxlora.config.schema import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    FieldError,
    Range,
    Section,
    did_you_mean,
    non_empty,
    rule,
    show,
)
from jaxlora.memory import grammar

Dtype = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "block", "auto"]
# PEFT's `init_lora_weights`: `default` (its True) is `kaiming`, A Kaiming-uniform and B = 0;
# besides these names, `pissa_niter_N` (`_check_init`).
InitKind = Literal["default", "kaiming", "gaussian", "pissa", "olora"]
DatasetKind = Literal["phonebook", "counterfact", "text", "qa", "paperqa", "narrativeqa", "quality"]
PaperHeader = Literal["bracket", "natural", "none"]
Leakage = Literal["error", "drop"]
LossMask = Literal["full", "completion_only"]
Schedule = Literal["cosine", "linear", "constant"]
Layout = Literal["auto", "groups", "padded"]
EvalPrompt = Literal["continuation", "question"]
UnitKind = Literal["none", "sectors", "documents", "chunks", "files"]
Truncate = Literal["head", "tail"]
Scope = Literal["global", "document"]
Pooling = Literal["mean", "last"]
MergeWeights = Literal["study", "mean", "ones"]
SignMethod = Literal["total", "frequency"]
Objective = Literal["ntp", "distill"]
DistillPreset = Literal["release_a", "release_b", "knowledge_modules"]
L1Norm = Literal["layer_mean", "sum_ratio"]

# The same names as jaxlora.models.transformer.LINEAR_MODULES and jaxlora.lora.TARGET_GROUPS
# (a test keeps them equal), repeated here so that reading a config never imports JAX.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = ("all-linear", "attention", "mlp")


# data.format: text, qa, qa_user, or a format or mix of a `jaxlora synth` directory (its file stem).
_DOC_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_doc_format(value: Any, path: str) -> None:
    if not _DOC_FORMAT.fullmatch(value):
        raise FieldError(
            path,
            "must be text, qa, qa_user, text_qa or a format of a jaxlora synth directory (letters, "
            f"digits, '_', '.', '-'), got {show(value)}",
        )


def _positive_or_auto(value: int | str, path: str) -> None:
    if value != "auto":
        POSITIVE(value, path)


def _check_buckets(value: str | tuple[int, ...], path: str) -> None:
    if isinstance(value, tuple):
        if not value:
            raise FieldError(path, "empty list; give rank ceilings such as [8, 64], or auto")
        POSITIVE(value, path)
        if list(value) != sorted(set(value)):
            raise FieldError(path, f"rank ceilings must increase, got {list(value)}")


def _mesh_axis(value: int, path: str) -> None:
    if value != -1 and value <= 0:
        raise FieldError(path, f"must be > 0, or -1 for all remaining devices; got {value}")


def _check_targets(value: str | tuple[str, ...], path: str) -> None:
    # A single string may name a group; list elements must be modules (`q` means `q_proj`).
    if isinstance(value, str):
        if value in TARGET_GROUPS or _module_name(value) in LINEAR_MODULES:
            return
        valid = [*TARGET_GROUPS, *LINEAR_MODULES]
        raise FieldError(
            path,
            f"unknown LoRA target {value!r}{did_you_mean(value, valid)}; use one of "
            f"{', '.join(valid)}, or a list of module names",
        )
    if not value:
        raise FieldError(path, "empty list; name at least one module or use all-linear")
    for i, name in enumerate(value):
        if _module_name(name) not in LINEAR_MODULES:
            raise FieldError(
                f"{path}[{i}]",
                f"unknown module {name!r}{did_you_mean(name, LINEAR_MODULES)}; a list names "
                f"modules from {', '.join(LINEAR_MODULES)}",
            )


# PiSSA from a randomised SVD with N >= 1 power iterations (jaxlora/svd.py reads N).
_PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")


def _check_init(value: str, path: str) -> None:
    names = typing.get_args(InitKind)
    if value in names or _PISSA_NITER.fullmatch(value):
        return
    raise FieldError(
        path,
        f"expected one of {', '.join(names)}, or pissa_niter_N with N >= 1 power iterations "
        f"(pissa_niter_4); got {show(value)}{did_you_mean(value, [*names, 'pissa_niter_4'])}",
    )


def _module_name(name: str) -> str:
    return name if name.endswith("_proj") else f"{name}_proj"


def _normalize_targets(value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    # Canonical spelling, so that [v, q_proj] and [q_proj, v_proj] are the same config (and the
    # same fingerprint); groups stay as written because they read better in a run record.
    if isinstance(value, str):
        return value if value in TARGET_GROUPS else _module_name(value)
    names = {_module_name(n) for n in value}
    return tuple(m for m in LINEAR_MODULES if m in names)


def _check_layers(value: tuple[int, ...] | None, path: str) -> None:
    if value == ():
        raise FieldError(path, "empty list; give layer indices, or null for every layer")
    NON_NEGATIVE(value, path)


def _sorted_unique(value: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(set(value)))


def _sorted_unique_or_name(value: str | tuple[int, ...]) -> str | tuple[int, ...]:
    return _sorted_unique(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    """The frozen base model. `path` is resolved by `jaxlora.models.load_pretrained` (an HF
    directory, a hub id, a jaxlora-converted directory or a built-in preset), not here."""

    _fixed: ClassVar[str] = "all adapters of a job share one base model"

    path: str = field(default="tiny-llama", metadata=rule(check=non_empty))
    dtype: Dtype = "float32"
    param_dtype: Dtype | None = None  # None: same as dtype
    # Recompute each block in the backward pass (block); auto: only where the job would not fit.
    remat: Remat = "auto"
    # The step runs the layers as one lax.scan (one compiled block; same params). auto: on GPUs
    # and TPUs, not CPUs (jaxlora.plan.resolve_model).
    scan_layers: bool | Literal["auto"] = "auto"


@dataclasses.dataclass(frozen=True)
class LoRASection(Section):
    """One adapter's LoRA hyperparameters; `alpha=None` means alpha = rank, resolved by
    `jaxlora.lora.LoRAConfig` so that a rank sweep keeps alpha/r = 1."""

    rank: int = field(default=8, metadata=rule(check=POSITIVE))
    alpha: float | None = field(default=None, metadata=rule(check=POSITIVE))
    targets: str | tuple[str, ...] = field(
        default="all-linear", metadata=rule(check=_check_targets, normalize=_normalize_targets)
    )
    layers: tuple[int, ...] | None = field(
        default=None, metadata=rule(check=_check_layers, normalize=_sorted_unique)
    )
    dropout: float = field(default=0.1, metadata=rule(check=UNIT))
    use_rslora: bool = False
    # default, kaiming, gaussian, pissa, olora, or pissa_niter_N (PiSSA from a randomised SVD
    # with N >= 1 power iterations, PEFT's fast SVD).
    init: str = field(
        default="kaiming",
        metadata=rule(check=_check_init, normalize=lambda v: "kaiming" if v == "default" else v),
    )
    # DoRA (PEFT's use_dora): a learned magnitude per output over the normalised W + s B A.
    use_dora: bool = False
    # LoRA+: B's learning rate as a multiple of A's (training.lr), per adapter; 1 is plain LoRA.
    lr_ratio: float = field(default=1.0, metadata=rule(check=POSITIVE))


_UNITS = "all adapters of a job are units of one corpus (data.unit is the unit axis)"


def _check_token_range(value: tuple[int | None, ...], path: str) -> None:
    for i, v in enumerate(value):
        if v is not None:
            NON_NEGATIVE(v, f"{path}[{i}]")
    low, high = value
    if low is not None and high is not None and low > high:
        raise FieldError(path, f"MIN {low} is larger than MAX {high}")


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    """The knowledge an adapter memorises. The budget is either `size_tokens` (tokens of the
    raw knowledge rows under the model's tokenizer, special tokens excluded) or `size_rows`;
    both None means the whole dataset."""

    dataset: DatasetKind = "phonebook"
    path: str | None = field(default=None, metadata=rule(check=non_empty))
    size_tokens: int | None = field(default=1000, metadata=rule(check=POSITIVE))
    size_rows: int | None = field(default=None, metadata=rule(check=POSITIVE))
    chat_template: bool = True
    loss_mask: LossMask = "full"
    max_length: int = field(default=128, metadata=rule(check=POSITIVE))
    seed: int = 0
    text_field: str = field(default="text", metadata=rule(check=non_empty))
    question_field: str = field(default="question", metadata=rule(check=non_empty))
    answer_field: str = field(default="answer", metadata=rule(check=non_empty))
    # The column naming each row's document (units of documents and chunks are cut within it).
    document_field: str | None = field(default=None, metadata=rule(check=non_empty, fixed=_UNITS))
    # One adapter per unit of the corpus (jaxlora/data/units.py); the budget cuts the corpus.
    units: UnitKind = field(default="none", metadata=rule(fixed=_UNITS))
    unit_count: int | None = field(default=None, metadata=rule(check=POSITIVE, fixed=_UNITS))
    unit_tokens: int | None = field(default=None, metadata=rule(check=POSITIVE, fixed=_UNITS))
    unit_overlap: int = field(default=0, metadata=rule(check=NON_NEGATIVE, fixed=_UNITS))
    # A csv/json/jsonl file of `unit` and `key` columns: the text routers search (summaries).
    unit_keys: str | None = field(default=None, metadata=rule(check=non_empty, fixed=_UNITS))
    # The unit this adapter learns; the job sets it for every unit when it is null.
    unit: str | None = field(default=None, metadata=rule(check=non_empty))
    # Document datasets (paperqa, narrativeqa, quality; jaxlora/data/docsets.py): what an
    # adapter trains on, and the leakage guard between it and the evaluation questions.
    format: str = field(default="text", metadata=rule(check=_check_doc_format))
    paper_header: PaperHeader = "bracket"
    question_prefix: PaperHeader = "none"
    train_path: str | None = field(default=None, metadata=rule(check=non_empty))
    split: str | None = field(default=None, metadata=rule(check=non_empty))
    leakage: Leakage = "error"
    # [MIN, MAX] tokens (the run's tokenizer, bounds inclusive, either null): the documents
    # kept, before the budget takes its first ones (the study's 35 books of 10-19K tokens).
    document_tokens: tuple[int | None, ...] | None = field(
        default=None, metadata=rule(check=_check_token_range)
    )

    def __post_init__(self) -> None:
        # The shape first: the field's type names its elements, not the pair.
        value = self.document_tokens
        if value is not None and not (isinstance(value, list | tuple) and len(value) == 2):
            raise FieldError(
                "document_tokens",
                f"must be [MIN, MAX] token counts (either may be null), got {show(value)}",
            )
        super().__post_init__()

    def _check(self) -> None:
        self._check_units()
        self._check_documents()
        if self.size_tokens is not None and self.size_rows is not None:
            raise FieldError(
                "size_rows",
                f"give either size_tokens ({self.size_tokens}) or size_rows "
                f"({self.size_rows}), not both; set the other to null",
            )
        # phonebook and the document datasets are generated when path is null (tiny corpora for
        # tests and the CI twins); counterfact, text and qa are always read.
        if self.path is None and self.dataset in ("counterfact", "text", "qa"):
            raise FieldError(
                "path",
                f"dataset {self.dataset} needs a path (phonebook, paperqa, narrativeqa and "
                "quality are generated without one)",
            )

    def _check_documents(self) -> None:
        documents = ("paperqa", "narrativeqa", "quality")
        if self.dataset not in documents:
            keys = (("format", "text"), ("train_path", None), ("split", None))
            for key, default in (*keys, ("document_tokens", None)):
                if getattr(self, key) != default:
                    raise FieldError(
                        key, "is for the document datasets paperqa, narrativeqa, quality"
                    )
            return
        if self.units == "files":
            raise FieldError(
                "units", f"dataset {self.dataset} has documents: use documents or chunks"
            )
        # `text` is the documents (paperqa: or the {text} rows of a study train_path); any other
        # format is read from train_path, which a non-paperqa dataset only takes as a jaxlora
        # synth directory (checked when read: config parsing never touches the filesystem).
        # The generated PaperQA corpus (path null) has training QA of its own (jaxlora/data/
        # generated.py) for the formats of the study's training layout.
        generated = self.dataset == "paperqa" and self.path is None
        generated = generated and self.format in ("qa", "qa_user", "text_qa")
        if self.format != "text" and self.train_path is None and not generated:
            if self.dataset != "paperqa":
                raise FieldError(
                    "format",
                    f"dataset {self.dataset} trains on its documents' text (format: text), or "
                    f"on format {self.format} of a jaxlora synth directory in data.train_path",
                )
            raise FieldError(
                "train_path",
                f"format {self.format} needs the training QA (e.g. the study's paperqa_train "
                "sets) or a jaxlora synth directory: the paperQA.json questions are the "
                "evaluation set",
            )
        if self.dataset == "paperqa" and self.split is not None:
            raise FieldError("split", "paperqa has one split (paperQA.json)")

    def _check_units(self) -> None:
        if self.units == "none":
            if self.unit is not None:
                raise FieldError("unit", "selects a unit, but data.units is none")
            return
        if self.units == "sectors" and (self.unit_count is None) == (self.unit_tokens is None):
            raise FieldError(
                "unit_count", "sectors need either unit_count (how many) or unit_tokens (how big)"
            )
        if self.units == "chunks":
            if self.unit_tokens is None:
                raise FieldError("unit_tokens", "chunks need a size in tokens (e.g. 2048)")
            if self.unit_overlap >= self.unit_tokens:
                raise FieldError(
                    "unit_overlap",
                    f"must be smaller than unit_tokens ({self.unit_tokens}), got "
                    f"{self.unit_overlap}",
                )
        if self.units == "files" and self.path is None:
            raise FieldError("path", "data.units: files needs a glob in data.path")


_STEP_LOOP = "all adapters of a job share one step loop"
_STACKING = "the layout decides how all adapters of a job are stacked together"


@dataclasses.dataclass(frozen=True)
class TrainingSection(Section):
    """Optimisation. Everything that is a number of the optimiser (lr, clipping, AdamW moments,
    seed) is per adapter and may be swept; what shapes the shared step loop is fixed."""

    steps: int = field(default=1500, metadata=rule(check=POSITIVE, fixed=_STEP_LOOP))
    batch_size: int = field(default=8, metadata=rule(check=POSITIVE, fixed=_STEP_LOOP))
    lr: float = field(default=5e-5, metadata=rule(check=POSITIVE))
    schedule: Schedule = field(default="cosine", metadata=rule(fixed=_STEP_LOOP))
    warmup_ratio: float = field(default=0.0, metadata=rule(check=UNIT))
    weight_decay: float = field(default=0.01, metadata=rule(check=NON_NEGATIVE))
    # Per-adapter global-norm clipping; None: none.
    clip_norm: float | None = field(default=1.0, metadata=rule(check=POSITIVE))
    adam_b1: float = field(default=0.9, metadata=rule(check=UNIT))
    adam_b2: float = field(default=0.999, metadata=rule(check=UNIT))
    adam_eps: float = field(default=1e-8, metadata=rule(check=POSITIVE))
    seed: int = 42
    # How adapters of different ranks share compiled stacks: groups (one per rank), padded
    # (one, zero-padded to the largest rank), a list of rank ceilings (one stack per bucket:
    # [8, 64] pads ranks <= 8 to 8 and the rest to 64), or auto: ranks share a bucket while
    # padding adds <= 5% to that bucket's FLOPs and <= 10% of a device's memory, and the job
    # stays within 90% of it (jaxlora.plan.choose_layout; logged, and the run's config.yaml
    # records the buckets).
    layout: Layout | tuple[int, ...] = field(
        default="auto", metadata=rule(check=_check_buckets, fixed=_STACKING)
    )
    # Adapters of a group trained at once on each device; the rest of the group follows in
    # sequential passes of the same compiled step. None: all at once. auto: 1 on CPUs (cache-
    # sized activations, the fastest CPU setting measured), all at once on GPUs and TPUs.
    adapters_per_pass: int | Literal["auto"] | None = field(
        default="auto", metadata=rule(check=_positive_or_auto, fixed=_STEP_LOOP)
    )
    # Rows of a step laid end to end in one sequence (segment ids; jaxlora/data/stream.py):
    # the same batch and loss without the padding. auto: when it saves >= 25% of positions and
    # no adapter has LoRA dropout (see jaxlora.data.stream.choose_packing).
    packing: bool | Literal["auto"] = field(default="auto", metadata=rule(fixed=_STEP_LOOP))
    # What an adapter learns: next-token prediction of its data, or to make the base model
    # without its unit's text behave like the base with it in context (the distill: section).
    objective: Objective = "ntp"
    log_every: int = field(default=10, metadata=rule(check=POSITIVE, fixed=_STEP_LOOP))


def _check_hidden_layers(value: str | tuple[int, ...], path: str) -> None:
    if value == ():
        raise FieldError(path, "empty list; give hidden-state indices, all or last")
    if isinstance(value, tuple):
        NON_NEGATIVE(value, path)


_TEACHER = "one job computes its teacher one way"
# The study's two released variants and the Knowledge Modules paper's recipe (docs/study.md §6).
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    # (a): KL per response token, no T^2; L1 the mean over every hidden state of mean|s-t|/mean|t|.
    "release_a": dict(layers="all", l1_norm="layer_mean", t_squared=False, response_only=True),
    # (b): KL x T^2, L1 on the last layer as sum|s-t| / sum|t|, over every token of the sample.
    "release_b": dict(layers="last", l1_norm="sum_ratio", t_squared=True, response_only=False),
    # Caccia et al. 2025 (deep context distillation): the layer-mean L1 and KL over the sample.
    "knowledge_modules": dict(
        layers="all", l1_norm="layer_mean", t_squared=False, response_only=False
    ),
}
_DISTILL_COMMON = dict(temperature=2.0, kl_weight=1.0, l1_weight=0.1)


@dataclasses.dataclass(frozen=True)
class DistillSection(Section):
    """The distillation objective (`training.objective: distill`; jaxlora/objectives.py). A key
    left null takes the preset's value; the preset itself fills keys and is not swept."""

    preset: DistillPreset = field(
        default="release_a", metadata=rule(fixed="a preset fills the other keys; sweep those")
    )
    temperature: float | None = field(default=None, metadata=rule(check=POSITIVE))
    kl_weight: float | None = field(default=None, metadata=rule(check=NON_NEGATIVE))
    l1_weight: float | None = field(default=None, metadata=rule(check=NON_NEGATIVE))
    # Hidden states in the L1 term: all (embeddings, every layer), last (the final-norm
    # output), or indices of transformers' hidden_states (0 embeddings ... num_layers).
    layers: Literal["all", "last"] | tuple[int, ...] | None = field(
        default=None, metadata=rule(check=_check_hidden_layers, normalize=_sorted_unique_or_name)
    )
    l1_norm: L1Norm | None = None
    t_squared: bool | None = None
    # Distil on the loss mask's targets (the response) only, or on every token of the sample.
    response_only: bool | None = None
    # The teacher's outputs: computed in every step, or once per sample before training and
    # read back (host memory); auto caches when the cache fits `cache_gb` (logged).
    teacher: Literal["auto", "step", "cache"] = field(default="auto", metadata=rule(fixed=_TEACHER))
    cache_gb: float = field(default=2.0, metadata=rule(check=POSITIVE, fixed=_TEACHER))

    def _check(self) -> None:
        for key, value in {**_DISTILL_COMMON, **DISTILL_PRESETS[self.preset]}.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.kl_weight == 0 and self.l1_weight == 0:
            raise FieldError("l1_weight", "kl_weight and l1_weight are both 0: nothing to learn")


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    """Device mesh axis sizes; -1 takes all devices the other axes leave."""

    _fixed: ClassVar[str] = "all adapters of a job share one device mesh"

    adapter: int = field(default=-1, metadata=rule(check=_mesh_axis))
    fsdp: int = field(default=1, metadata=rule(check=_mesh_axis))
    tensor: int = field(default=1, metadata=rule(check=_mesh_axis))

    def _check(self) -> None:
        free = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) == -1]
        if len(free) > 1:
            raise FieldError(free[1], f"at most one mesh axis may be -1 ({' and '.join(free)})")


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
    """Orbax checkpointing of the whole job."""

    _fixed: ClassVar[str] = "all adapters of a job are checkpointed together"

    every_steps: int = field(default=500, metadata=rule(check=POSITIVE))
    keep: int = field(default=2, metadata=rule(check=POSITIVE))
    async_: bool = field(default=True, metadata=rule(key="async"))


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    """Evaluation after training; the section itself is None when there is none."""

    _fixed: ClassVar[str] = "all adapters of a job are evaluated together"

    max_new_tokens: int = field(default=50, metadata=rule(check=POSITIVE))
    # Questions per adapter per decoding batch.
    batch_size: int = field(default=64, metadata=rule(check=POSITIVE))
    # CounterFact efficacy: score the target token as it follows the prompt (" Paris"), not the
    # bare word the original study compared.
    efficacy_leading_space: bool = True
    # How a row is asked: its training text up to the answer (recall of what was stored), or
    # the question alone as a fresh user turn.
    prompt: EvalPrompt = "continuation"
    # A separate question/answer file to evaluate on (csv/json/jsonl with the data section's
    # question and answer fields); null: each adapter is asked its own training knowledge.
    path: str | None = field(default=None, metadata=rule(check=non_empty))
    # Score every answer with the LLM judge (the llm: section) beside the metrics.
    judge: bool = False


def _memory_rule(check: str):
    """A check by the memory method grammar (jaxlora/memory/grammar.py, pure Python)."""

    def run(value: Any, path: str) -> None:
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            try:
                getattr(grammar, check)(v)
            except grammar.MethodError as e:
                where = f"{path}[{i}]" if isinstance(value, tuple) else path
                raise FieldError(where, str(e)) from None

    return run


@dataclasses.dataclass(frozen=True)
class MemorySection(Section):
    """The adapter library as a memory, evaluated after training (or by `jaxlora memory`):
    every method (jaxlora/memory/grammar.py) on every question, in batched passes."""

    _fixed: ClassVar[str] = "the memory is evaluated once, over the whole library"

    methods: tuple[str, ...] = field(
        default=("base", "oracle", "bm25", "bm25@3/ties", "base+icl", "base+rag@3"),
        metadata=rule(check=_memory_rule("parse_method")),
    )
    # A csv/json/jsonl of questions (data.question_field / answer_field, and `unit` and/or
    # data.document_field columns); null: every unit's own questions.
    questions: str | None = field(default=None, metadata=rule(check=non_empty))
    # How a question is asked: as trained (a row's text up to its answer) or as a new user turn.
    prompt: EvalPrompt = "continuation"
    # A preset (phonebook, counterfact, paperqa, narrativeqa, quality) or a template with
    # {context} and {question}; auto: the preset of data.dataset (paperqa for qa/text).
    template: str = field(default="auto", metadata=rule(check=_memory_rule("template_text")))
    unit_format: str = field(
        default="{text}", metadata=rule(check=_memory_rule("check_unit_format"))
    )
    context_tokens: int = field(default=24576, metadata=rule(check=POSITIVE))
    truncate: Truncate | None = None
    rag_router: Literal["bm25", "embedding"] = "bm25"
    scope: Scope = "global"
    # BM25 terms: words and runs of up to this many words. Pairs keep full names together: on
    # the study's 16 x 385-row PhoneBook sectors top-1 routing is 0.34 with words, 0.997 with
    # pairs (tests/test_routers.py).
    bm25_ngrams: int = field(default=2, metadata=rule(check=Range(lo=1, hi=2, hi_open=False)))
    # The embedding router: a Llama/Qwen checkpoint (null: the run's base model).
    encoder: str | None = field(default=None, metadata=rule(check=non_empty))
    pooling: Pooling = "mean"
    query_instruction: str | None = field(default=None, metadata=rule(check=non_empty))
    encoder_max_length: int = field(default=512, metadata=rule(check=POSITIVE))
    # Embed only the first encoder_max_length tokens of a longer key (counted) instead of failing.
    encoder_truncate: bool = False
    # Merge weights per source: the study's (1/k for linear and delta_sum, 1 otherwise), 1/k, 1.
    merge_weights: MergeWeights = "study"
    density: float = field(default=0.5, metadata=rule(check=FRACTION))
    majority_sign_method: SignMethod = "total"
    seed: int = 0
    # arrow@K methods: the softmax temperature of Arrow's per-token coefficients (PEFT's
    # router_temperature).
    arrow_temperature: float = field(default=1.0, metadata=rule(check=POSITIVE))
    max_new_tokens: int = field(default=50, metadata=rule(check=POSITIVE))
    batch_size: int = field(default=64, metadata=rule(check=POSITIVE))
    # Score every answer with the LLM judge (the llm: section) beside the metrics.
    judge: bool = False
    # QuALITY: also score each question by the log-likelihood of every option's text after the
    # prompt (one teacher-forced forward per option; loglik_accuracy, loglik_hard_accuracy).
    loglik: bool = True
    # Tokens (prompt + new, over the rows) of one decoding pass: long ICL prompts take fewer rows.
    max_batch_tokens: int = field(default=131072, metadata=rule(check=POSITIVE))


@dataclasses.dataclass(frozen=True)
class LLMSection(Section):
    """An LLM beside the model under study, for the judge (and `jaxlora synth`): the jaxlora
    model in process (`local`) or any OpenAI-compatible endpoint (`openai`); see
    jaxlora/llm/backends.py. `model` is a path, hub id, preset or run dir (local), or the
    endpoint's model name (openai)."""

    _fixed: ClassVar[str] = "one LLM serves the whole job"

    backend: Literal["local", "openai"] = "local"
    model: str | None = field(default=None, metadata=rule(check=non_empty))
    adapter: str | None = field(default=None, metadata=rule(check=non_empty))  # local
    dtype: Dtype | None = None  # local; null: the checkpoint's own or float32
    max_batch: int = field(default=32, metadata=rule(check=POSITIVE))  # local: rows per pass
    base_url: str | None = field(default=None, metadata=rule(check=non_empty))  # openai
    # openai: the environment variable holding the key (null: OPENAI_API_KEY for
    # api.openai.com, no key for a base_url)
    api_key_env: str | None = field(default=None, metadata=rule(check=non_empty))
    max_concurrency: int = field(default=8, metadata=rule(check=POSITIVE))  # openai
    timeout_s: float = field(default=120.0, metadata=rule(check=POSITIVE))  # openai, per request
    max_retries: int = field(default=4, metadata=rule(check=NON_NEGATIVE))  # openai
    backoff_s: float = field(default=1.0, metadata=rule(check=NON_NEGATIVE))  # doubled per retry

    def _check(self) -> None:
        if self.model is None:
            raise FieldError(
                "model", "required: a model path, preset or run dir, or the endpoint's model name"
            )
        if self.backend == "local" and (self.base_url or self.api_key_env):
            raise FieldError(
                "base_url" if self.base_url else "api_key_env", "is for backend: openai"
            )
        if self.backend == "openai" and self.adapter:
            raise FieldError(
                "adapter", "is for backend: local (an endpoint names its adapters as models)"
            )
