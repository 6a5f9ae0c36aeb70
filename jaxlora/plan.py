"""`jaxlora plan`: per-device memory and step time of a job, from shapes alone.

Nothing is allocated: parameter shapes come from `jax.eval_shape` of the model and of each
adapter group, and each tensor's per-device size from the same logical-axis rules the job
uses. Activations are an estimate (documented in `activation_bytes`); the step time assumes a
model-FLOPs utilisation that the user states.

FLOPs per trained token (the convention of benchmarks/README.md): 4 x (non-embedding base
parameters + lm_head) for the forward and input-gradient passes through the frozen base, plus
6 x the adapter's parameters (forward, input gradient and weight gradient of A and B). A plan's
FLOPs per step add what `model.remat: block` recomputes (`recompute_flops_per_token`)
and the attention products (`attention_flops_per_token`), over every slot of the step (inert
padding slots run too): the FLOPs a chip executes in its products, which `plan --aot` checks
against the compiler's count.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from jaxlora.cells import (
    CellPlan,
    Group,
    build_groups,
    expand_units,
    plan_cells,
    resolve_per_pass,
)
from jaxlora.config import Config
from jaxlora.errors import JaxloraError
from jaxlora.lora import placement_params, union_placement
from jaxlora.models.config import ModelConfig
from jaxlora.models.model import abstract_module, local_tokenizer, model_config, parse_dtype
from jaxlora.objectives import loss_chunk
from jaxlora.plan_decode import decode_rows, dims, layer_bytes, prefill_rows, rows_per_device
from jaxlora.sharding import logical_spec, mesh_sizes

GIB = 1024**3

# Accelerators for `jaxlora plan --device`: memory in bytes and dense bf16 peak FLOP/s, from the
# vendors' published specifications (H100/H200 SXM, TPU v4/v5e/v5p).
DEVICES = {
    "h100": (80e9, 989e12),
    "h200": (141e9, 989e12),
    "a100-80g": (80e9, 312e12),
    "tpu-v4": (32 * 2**30, 275e12),
    "tpu-v5e": (16 * 2**30, 197e12),
    "tpu-v5p": (95 * 2**30, 459e12),
}


class PlanError(JaxloraError):
    """The job does not fit the devices."""


def shard_bytes(
    state: nnx.State,
    sizes: Mapping[str, int],
    *,
    dtype_bytes: int | None = None,
    leading: tuple[tuple[str, int], ...] = (),
) -> int:
    """Bytes of `state` held by one device (optionally with extra leading stacked axes)."""
    total = 0
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        axes = tuple(a for a, _ in leading) + tuple(
            var.get_metadata().get("axes", (None,) * value.ndim)
        )
        shape = tuple(n for _, n in leading) + tuple(value.shape)
        spec = logical_spec(axes, shape, sizes)
        local = 1
        for dim, mesh_axis in zip(
            shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True
        ):
            local *= dim // sizes[mesh_axis] if mesh_axis else dim
        total += local * (dtype_bytes or np.dtype(value.dtype).itemsize)
    return total


def activation_bytes(
    c: ModelConfig,
    tokens: int,
    seq: int,
    dtype_bytes: int,
    remat: str,
    lora_rank: int = 0,
    batch: int = 1,
    dropout: bool = False,
) -> int:
    """Estimated activations kept for the backward pass of one adapter's batch (`tokens` rows x
    positions on the device, sequences of length `seq`; `batch` rows in all, as the loss's
    chunks are cut).

    Per layer and token: the two norm inputs and outputs (4D), q, k, v and the attention output
    ((2N + 2K)H), the MLP's gate, up, activation and down input (4F) and LoRA intermediates
    (7 rank-R vectors); with `dropout`, the random words of the LoRA inputs' masks, a uint32
    per element of the widest input (the down projection's F), two drawn at once; per layer
    and sequence, attention logits and probabilities in float32 (2 N T^2 per sequence). With
    `remat="block"` only each block's input is kept, plus one block's full activations during
    its recomputation. The loss takes a chunk of positions at a time (`objectives.loss_chunk`):
    a chunk's float32 logits and their gradient, [rows, chunk, V] each (the TPU compiler's
    buffers of the 1B and 8B steps hold `f32[adapters, rows, 8, 128256]`, 2026-12-07).
    """
    D, F, N, K, H, L, V = dims(c)
    per_token = (4 * D + (2 * N + 2 * K) * H + 4 * F + 7 * lora_rank) * dtype_bytes
    per_token += 2 * F * 4 if dropout else 0
    per_layer = tokens * per_token + (tokens // seq) * 2 * N * seq * seq * 4
    layers = L * per_layer if remat == "none" else L * tokens * D * dtype_bytes + per_layer
    return layers + 2 * (tokens // seq) * loss_chunk(batch, seq, V) * V * 4


def flops_per_token(c: ModelConfig, lora_params: float) -> float:
    """4 x (non-embedding base parameters + lm_head) + 6 x LoRA parameters."""
    *_, base = abstract_module(c)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(base))
    # Tied: the embedding matrix *is* the lm_head, so it counts once; untied: drop the input table.
    counted = total if c.tie_word_embeddings else total - c.vocab_size * c.hidden_size
    return 4 * counted + 6 * lora_params


def recompute_flops_per_token(c: ModelConfig, lora_params: float, remat: str) -> float:
    """What `remat` adds per token: with "block" the backward pass runs each block's forward
    again, 2 x (the blocks' parameters + the adapter's); the embedding, final norm and lm_head
    are outside the blocks and run once."""
    if remat == "none":
        return 0.0
    *_, base = abstract_module(c)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(base))
    tables = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return 2 * (total - tables - c.hidden_size) + 2 * lora_params


def attention_flops_per_token(c: ModelConfig, seq: int, remat: str) -> float:
    """The attention products, which no parameter counts: q k^T and p v, 2 x 2 x seq x N x H
    per layer forward (dense over the sequence, as the kernels compute a training row), twice
    that backward (both operands are activations), and the forward again under remat."""
    _, _, N, _, H, L, _ = dims(c)
    return 4 * seq * N * H * L * (3 if remat == "none" else 4)


@dataclasses.dataclass
class Plan:
    config: Config
    devices: int
    device_memory: float  # bytes
    sizes: dict[str, int]
    rows: list[tuple[str, float]]  # (label, bytes per device)
    adapters: int
    slots: int
    groups: int
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float
    mfu: float
    prefill: list[tuple[str, float]] | None = None  # rows of a long-context prefill
    prefill_full_attention: float = 0.0  # bytes the full kernel's logits would add
    context: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)  # what `auto` settings chose
    # evaluation's decoding (`eval:`), per group: `decode_rows`
    decoding: list[list[tuple[str, float]]] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    @property
    def step_seconds(self) -> float:
        return self.flops_per_step / (self.devices * self.peak_flops * self.mfu)

    def render(self) -> str:
        t = self.config.training
        s = self.sizes
        layout = list(t.layout) if isinstance(t.layout, tuple) else t.layout
        lines = [
            f"model {self.config.model.path} ({self.config.model.dtype}); {self.adapters} adapters in "
            f"{self.groups} group(s), {self.slots} slots with padding (layout {layout})",
            f"mesh adapter={s['adapter']} x fsdp={s['fsdp']} x tensor={s['tensor']} on {self.devices} "
            f"devices of {self.device_memory / GIB:.1f} GiB",
            *self.notes,
            "per-device memory:",
        ]
        lines += _table(self.rows, self.device_memory)
        hours = self.step_seconds * t.steps / 3600
        lines += [
            "step time estimate:",
            f"  tokens per step          {self.tokens_per_step:,} ({self.adapters} adapters x batch "
            f"{t.batch_size} x length <= {self.config.data.max_length})",
            f"  FLOPs per step           {self.flops_per_step:.3e}"
            + " (products: parameters, attention"
            + (", remat's recompute)" if self.config.model.remat != "none" else ")"),
            f"  assumed throughput       {self.devices} x {self.peak_flops / 1e12:.0f} TFLOP/s x MFU "
            f"{self.mfu:.0%}",
            f"  => {self.step_seconds:.3f} s/step, {hours:.2f} h for {t.steps} steps",
        ]
        if self.decoding:
            k = max(range(len(self.decoding)), key=lambda i: sum(b for _, b in self.decoding[i]))
            e = self.config.eval
            lines.append(
                f"evaluation decoding ({e.batch_size} prompts per adapter + {e.max_new_tokens} "
                f"tokens; group {k}, the largest), per device:"
            )
            lines += _table(self.decoding[k], self.device_memory)
        if self.prefill:
            lines.append(f"prefill of {self.context:,} tokens (batch 1, no adapter), per device:")
            lines += _table(self.prefill, self.device_memory)
            lines.append(
                f"  (full [T, S] attention logits would add {self.prefill_full_attention / GIB:.2f} "
                "GiB)"
            )
        return "\n".join(lines)

    @property
    def prefill_total(self) -> float:
        return sum(b for _, b in self.prefill or [])


def _table(rows: Sequence[tuple[str, float]], device_memory: float) -> list[str]:
    """`rows` of (what, bytes) and their total against `device_memory`, the labels aligned."""
    width = max(34, *(len(label) + 2 for label, _ in rows))
    total = sum(b for _, b in rows)
    verdict = "fits" if total <= device_memory else "does NOT fit"
    lines = [f"  {label:<{width}}{b / GIB:>10.2f} GiB" for label, b in rows]
    return [*lines, f"  {'total':<{width}}{total / GIB:>10.2f} GiB  ({verdict})"]


def device_memory_bytes(device: jax.Device) -> float:
    """A device's memory: the allocator's limit on accelerators; on CPU the host's physical
    memory shared by its local devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return physical / max(jax.local_device_count(), 1)


def adapter_state(config: Config, adapter_b: float) -> list[tuple[str, float]]:
    """The training step's copies of `adapter_b` bytes of float32 adapters: the weights, their
    gradients and AdamW's two moments; the weights cast to the model dtype once, every
    layer's before the forward (`bf16[32,20,8,14336]` in the 8B's rank-64 step, 2026-12-07);
    and with `model.scan_layers`, the gradients as they leave the layer loop, layer-major
    (`f32[32,20,8,14336]`), before they are laid out as the adapters are."""
    dtype_bytes = np.dtype(parse_dtype(config.model.dtype)).itemsize
    rows = [
        ("adapter weights (float32)", adapter_b),
        ("AdamW moments (2 x float32)", 2 * adapter_b),
        ("adapter gradients (float32)", adapter_b),
    ]
    if dtype_bytes < 4:
        rows.append(("adapters cast to the model dtype", adapter_b * dtype_bytes / 4))
    if config.model.scan_layers:
        rows.append(("scan's layer-major gradients (float32)", adapter_b))
    return rows


def job_memory(
    config: Config, c: ModelConfig, plans: Sequence[CellPlan], groups: Sequence[Group], sizes
) -> tuple[list[tuple[str, float]], float]:
    """Per-device memory rows of a training job laid out in `groups`, and its LoRA FLOPs per
    step (6 x each adapter's own parameters x its tokens)."""
    dtype_bytes = np.dtype(parse_dtype(config.model.dtype)).itemsize
    param_bytes = np.dtype(parse_dtype(config.model.param_dtype or config.model.dtype)).itemsize
    *_, base = abstract_module(c)
    base_b = shard_bytes(base, sizes, dtype_bytes=param_bytes)
    adapter_b = act_b = teacher_b = residual_b = 0.0
    B, T = config.training.batch_size, max(p.cell.config.data.max_length for p in plans)
    lora_flops = 0.0
    for g in groups:
        members = [plans[i] for i in g.slots if i is not None]
        placement = union_placement([p.lora for p in members])
        _, weights, consts, _ = abstract_module(c, placement)
        leading = (("adapter", len(g.slots)),)
        adapter_b += shard_bytes(weights, sizes, leading=leading)
        if placement.residual:  # PiSSA/OLoRA: each adapter's frozen A0, B0 (as its A, B)
            frozen = nnx.from_flat_state(
                [(k, v) for k, v in nnx.to_flat_state(consts) if k[-1] in ("lora_a0", "lora_b0")]
            )
            residual_b += shard_bytes(frozen, sizes, leading=leading)
        slots_local = math.ceil(len(g.slots) / sizes["adapter"])
        # Activations live one pass at a time; a plan is for accelerators, where auto trains a
        # group's adapters all at once.
        per_pass = resolve_per_pass(config.training.adapters_per_pass, "gpu", B * T)
        if per_pass is not None:
            slots_local = min(slots_local, per_pass)
        dropout = any(p.lora.dropout > 0 for p in members)
        act_b += slots_local * activation_bytes(
            c,
            B * T // sizes["fsdp"],
            T,
            dtype_bytes,
            config.model.remat,
            placement.rank,
            batch=B,
            dropout=dropout,
        )
        lora_flops += sum(p.lora.num_params(c) for p in members) * B * T * 6
        if members[0].objective is not None:  # the teacher's logits and hidden states, float32
            width = c.vocab_size + len(members[0].objective.layers) * c.hidden_size
            teacher_b += slots_local * B * T // sizes["fsdp"] * width * 4
    rows = [
        ("base weights", base_b),
        *adapter_state(config, adapter_b),
        (f"activations (estimate, remat={config.model.remat})", act_b),
    ]
    # What the step's products take whole: the output head's table for the loss's chunks, and
    # a layer's projections at a time (the compiler's buffers of the 1B and 8B steps: the
    # table gathered over fsdp or copied once, `bf16[4096,128256]`; a layer's kernels
    # gathered, or sliced from the scanned stack)
    t = sizes["tensor"]
    rows.append(("output head's table, whole", c.vocab_size * c.hidden_size * dtype_bytes / t))
    if sizes["fsdp"] > 1 or config.model.scan_layers:
        rows.append(("a layer's kernels, whole", layer_bytes(c, dtype_bytes, t)))
    if residual_b:
        rows.append(("residual corrections (float32)", residual_b))
    if teacher_b:  # the teacher's own forward keeps nothing for the backward pass
        rows.append(("teacher outputs (float32)", teacher_b))
    return rows, lora_flops


# `training.layout: auto`: ranks share a stack while padding adds at most AUTO_PAD_FLOPS to the
# stack's FLOPs per step and AUTO_PAD_MEMORY of a device's memory in all, and the job stays
# within AUTO_FIT of a device's memory (headroom for the activations' estimate).
AUTO_PAD_FLOPS = 0.05
AUTO_PAD_MEMORY = 0.1
AUTO_FIT = 0.9


def choose_layout(
    config: Config,
    c: ModelConfig,
    plans: Sequence[CellPlan],
    sizes: Mapping[str, int],
    device_memory: float,
) -> tuple[tuple[int, ...], str]:
    """`training.layout: auto` as rank ceilings, and why.

    Every rank group is its own program body in the compiled step (minutes of compilation per
    group at 8B scale, benchmarks/README.md), while padding a small rank to a larger one costs
    only the extra LoRA FLOPs and adapter memory (exact: padded entries stay zero). So ranks
    are taken in increasing order and each joins the bucket before it when padding the bucket
    to the new rank (1) adds at most AUTO_PAD_FLOPS to the bucket's FLOPs per step (base
    forward and input gradient, plus 6 x LoRA parameters, per token), and (2) the padding's
    weights, gradients and AdamW moments, over all buckets, take at most AUTO_PAD_MEMORY of a
    device's memory and leave the job (`job_memory`) within AUTO_FIT of it."""
    base = flops_per_token(c, 0)
    objectives = sorted({p.objective for p in plans}, key=repr)
    ranks = sorted({p.lora.rank for p in plans})

    def params(bucket: Sequence[int], padded: bool) -> int:
        """LoRA parameters of the adapters with these ranks: one stack per rank, or one
        stack padded to the bucket's largest rank (per objective: objectives never share)."""
        total = 0
        for objective in objectives:
            for group in [bucket] if padded else [[r] for r in bucket]:
                loras = [p.lora for p in plans if p.objective == objective and p.lora.rank in group]
                if loras:
                    placement = union_placement(loras)
                    if padded:
                        placement = dataclasses.replace(placement, rank=bucket[-1])
                    total += len(loras) * placement_params(c, placement)
        return total

    def padding(bucket: Sequence[int]) -> int:
        return params(bucket, True) - params(bucket, False)

    rows, _ = job_memory(
        config, c, plans, build_groups(plans, tuple(ranks), sizes["adapter"]), sizes
    )
    need, padded = sum(b for _, b in rows), 0.0
    # a float32 parameter's copies in the step, split on adapter
    per_param = sum(b for _, b in adapter_state(config, 4.0)) / sizes["adapter"]
    buckets: list[list[int]] = []
    for rank in ranks:
        if buckets:
            merged = [*buckets[-1], rank]
            n = sum(p.lora.rank in merged for p in plans)
            extra = padding(merged)
            more = per_param * (extra - padding(buckets[-1]))
            cheap = 6 * extra <= AUTO_PAD_FLOPS * (n * base + 6 * params(merged, False))
            small = padded + more <= AUTO_PAD_MEMORY * device_memory
            if cheap and small and need + more <= AUTO_FIT * device_memory:
                buckets[-1], need, padded = merged, need + more, padded + more
                continue
        buckets.append([rank])
    tops = tuple(b[-1] for b in buckets)
    memory = f"{need / GIB:.1f} GiB of the device's {device_memory / GIB:.1f} per device"
    if len(ranks) == 1:
        return tops, f"one rank, one group ({memory})"
    if len(tops) == len(ranks):
        return tops, f"one group per rank ({memory}): padding would cost > 5% FLOPs or memory"
    return tops, f"ranks padded to {list(tops)} (<= 5% more FLOPs per stack; {memory})"


def resolve_model(
    config: Config,
    c: ModelConfig,
    plans: Sequence[CellPlan],
    sizes: Mapping[str, int],
    device_memory: float,
    platform: str,
) -> tuple[Config, list[str]]:
    """`model.scan_layers: auto` and `model.remat: auto` for a job on `platform` devices
    ("cpu", "gpu", "tpu") of `device_memory` bytes, and why, a line each.

    Layers scan on GPUs and TPUs: the step compiles one block instead of every layer (the 8B's:
    about a minute instead of seven on 2 cores) and the TPU compiler holds less (the 8B step of
    issue 26, v5e 2/4/1: 18.0 GiB a chip scanned, 43.5 unrolled). On CPUs they run unrolled,
    the faster there (the 2-layer quickstart's step, 1.15x). Blocks are recomputed in the
    backward pass only where the job without it (`job_memory`, its ranks in their own groups,
    the layout not yet chosen) would take more than AUTO_FIT of a device's memory: remat costs
    a second forward, a third more FLOPs, that a job which fits need not pay."""
    why = []
    if config.model.scan_layers == "auto":
        scan = platform != "cpu"
        config = config.with_value("model.scan_layers", scan)
        why.append(f"model.scan_layers=auto: {str(scan).lower()} on {platform}")
    if config.model.remat == "auto":
        ranks = tuple(sorted({p.lora.rank for p in plans}))
        groups = build_groups(plans, ranks, sizes["adapter"])
        plain = config.with_value("model.remat", "none")
        need = sum(b for _, b in job_memory(plain, c, plans, groups, sizes)[0])
        remat = "none" if need <= AUTO_FIT * device_memory else "block"
        config = config.with_value("model.remat", remat)
        why.append(
            f"model.remat=auto: {remat} ({need / GIB:.1f} GiB per device without it, of "
            f"{device_memory / GIB:.1f})"
        )
    return config, why


def make_plan(
    config: Config,
    devices: int,
    device_memory_gib: float,
    peak_tflops: float,
    mfu: float,
    context: int = 0,
    platform: str = "gpu",
) -> Plan:
    """The job's plan on `platform` devices (its `auto` model settings resolve for it); with
    `context` > 0 also the memory of a prefill of that many tokens."""
    if devices <= 0:
        raise PlanError(f"--devices must be positive, got {devices}")
    c = model_config(config.model.path)
    sizes = mesh_sizes(config.mesh.adapter, config.mesh.fsdp, config.mesh.tensor, devices)
    dtype_bytes = np.dtype(parse_dtype(config.model.dtype)).itemsize
    notes: list[str] = []
    if config.data.units != "none":  # one adapter per unit, as `jaxlora train` cuts them
        tokenizer = local_tokenizer(config.model.path, c)
        if tokenizer is None:
            notes.append(
                "data.units: not cut (no local tokenizer at model.path), so adapters count the "
                "config's cells, not one per unit; plan with a local model directory"
            )
        else:
            config, units = expand_units(config, tokenizer)
            shape = str(config.model.path).endswith("-shape")
            notes.append(
                f"data.units: {len(units)} units, one adapter each"
                + (" (cut with the shape preset's stand-in tokenizer)" if shape else "")
            )
    plans = plan_cells(config, c)
    config, why_model = resolve_model(config, c, plans, sizes, device_memory_gib * GIB, platform)
    notes += why_model
    layout = config.training.layout
    if layout == "auto":
        layout, why = choose_layout(config, c, plans, sizes, device_memory_gib * GIB)
        config = config.with_value("training.layout", list(layout))
        notes.append(f"training.layout=auto: {why}")
    groups = build_groups(plans, layout, sizes["adapter"])
    rows, lora_flops = job_memory(config, c, plans, groups, sizes)
    B, T = config.training.batch_size, max(p.cell.config.data.max_length for p in plans)
    tokens = len(plans) * B * T
    # The step runs every slot, padding included (inert slots that fill a group to a multiple
    # of the adapter devices): the base's FLOPs are the slots'; the LoRA FLOPs, the adapters'.
    executed = sum(len(g.slots) for g in groups) * B * T
    remat = config.model.remat
    flops = (flops_per_token(c, 0) + attention_flops_per_token(c, T, remat)) * executed
    flops += recompute_flops_per_token(c, 0, remat) * executed + lora_flops
    flops += lora_flops / 3 if remat != "none" else 0.0  # the adapters' 2 of 6 x, again
    decoding = []
    if config.eval is not None:  # as evaluation decodes each group's stack (aot.eval_programs)
        for g in groups:
            placement = union_placement([plans[i].lora for i in g.slots if i is not None])
            _, weights, _, _ = abstract_module(c, placement)
            adapter_b = shard_bytes(weights, sizes, leading=(("adapter", len(g.slots)),))
            prompts, split = rows_per_device(config.eval.batch_size, sizes["fsdp"])
            local = math.ceil(len(g.slots) / sizes["adapter"]) * prompts
            decoding.append(
                decode_rows(
                    c,
                    sizes,
                    local,
                    T,
                    config.eval.max_new_tokens,
                    dtype_bytes,
                    rows[0][1],
                    adapter_b,
                    rows_split=split,
                    hbm=device_memory_gib * GIB,
                )
            )
    prefill, full = (None, 0.0)
    if context > 0:
        prefill, full = prefill_rows(c, context, dtype_bytes, sizes, rows[0][1])
    return Plan(
        config,
        devices,
        device_memory_gib * GIB,
        sizes,
        rows,
        len(plans),
        sum(len(g.slots) for g in groups),
        len(groups),
        tokens,
        flops,
        peak_tflops * 1e12,
        mfu,
        prefill,
        full,
        context,
        notes,
        decoding,
    )
