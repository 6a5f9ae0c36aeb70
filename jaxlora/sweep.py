"""`jaxlora train`: every adapter of a grid trained in one jitted job.

The job, in order: parse the config and expand the sweep into cells; load the model onto the
mesh; check every cell's adapter and data *before* touching the run directory (bad input
writes nothing); stack the adapters in rank groups (or one padded group), each padded to a
multiple of the mesh's `adapter` axis with inert slots; run the compiled step; checkpoint with
Orbax; export every adapter in PEFT format with a summary table (jaxlora/run_files.py).

Independence of cells: see `jaxlora.cells`, which plans them and their data.

Multi-host: every process runs the same program; batches are global arrays built with
`make_array_from_callback`, so each process tokenizes and feeds only the adapters whose shards
live on its devices.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.cells import (
    Group,
    count_passes,
    resolve_per_pass,
    seed_key,
)
from jaxlora.checkpoint import RunCheckpoints
from jaxlora.config import Config, DistillSection, load_config
from jaxlora.data.stream import choose_packing
from jaxlora.errors import DataError, JaxloraError
from jaxlora.evaluate import plural
from jaxlora.fsutil import RunLock, atomic_write, check_new_dir
from jaxlora.job import Job
from jaxlora.lora import AdapterStack, init_adapters
from jaxlora.objectives import teacher_outputs
from jaxlora.peft_io import save_peft
from jaxlora.resume import Interrupts, result_fingerprint
from jaxlora.run_files import summary_row, write_documents, write_summary, write_units
from jaxlora.sharding import logical_spec
from jaxlora.train import GroupState, Hyper, StepConfig, TrainState, compile_step

log = logging.getLogger(__name__)


# What a job leaves for a reader, in the order its last lines name them (`output_lines`).
OUTPUTS = (
    ("results", "results.csv"),
    ("report", "report.md"),
    ("memory results", "memory_results.csv"),
    ("memory report", "memory_report.md"),
)


def output_lines(run_dir: str | Path, memory_only: bool = False) -> list[str]:
    """The last lines of `jaxlora train` / `eval`: each table, report and plot of the run that
    exists, with its path (`results: runs/pb/results.csv`); the plots are named by their PNG
    files, each with an SVG twin beside it. `memory_only`: those of `jaxlora memory`'s result
    set (a run directory or its memory_sets/NAME) alone."""
    run_dir = Path(run_dir)
    outputs = [(w, n) for w, n in OUTPUTS if not memory_only or n.startswith("memory_")]
    lines = [f"{what}: {run_dir / name}" for what, name in outputs if (run_dir / name).is_file()]
    pngs = sorted((run_dir / "plots").glob("*.png"))
    for what, mine in (
        ("plots", [] if memory_only else [p for p in pngs if not p.name.startswith("memory_")]),
        ("memory plots", [p for p in pngs if p.name.startswith("memory_")]),
    ):
        if mine:
            lines.append(f"{what} (png, and svg beside): {', '.join(str(p) for p in mine)}")
    return lines


class SweepJob(Job):
    """One training job over every cell of a config."""

    def __init__(
        self,
        config: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.config, self.run_dir = config, Path(run_dir)
        self.resume, self.progress, self.overwrite = resume, progress, overwrite
        if resume and overwrite:
            raise JaxloraError("--resume and --overwrite exclude each other; pick one")
        if resume:
            self._check_resumable()
        else:
            check_new_dir(self.run_dir, overwrite=overwrite, flag="--overwrite (or --resume)")
        super().__init__(self.config, devices)
        if resume:
            self._check_same_results(self.config)  # units expanded
        if self.config.memory is not None:
            from jaxlora.memory.compose import check_library

            check_library(self.config.memory.methods, len(self.units))
        if any(s is not None and s.judge for s in (self.config.eval, self.config.memory)):
            from jaxlora.llm.judge import metric_judge  # a judge that cannot fit: before training

            metric_judge(self.config.llm)
        self.data.prepare(sorted({i for g in self.local for i in g}))
        self.packed, why = choose_packing(
            self.config.training.packing,
            width=self.data.width,
            batch_size=self.config.training.batch_size,
            length=self.data.packed_length,
            fsdp=self.mesh.shape["fsdp"],
            dropout=any(p.lora.dropout > 0 for p in self.plans),
            distill=any(p.objective is not None for p in self.plans),
        )
        log.info(
            "training.packing=%s: %s (%s)",
            self.config.training.packing,
            "packed rows" if self.packed else "rows as they are",
            why,
        )
        setting, platform = (
            self.config.training.adapters_per_pass,
            self.mesh.devices.flat[0].platform,
        )
        positions = math.prod(self._batch_shape())
        self.per_pass = resolve_per_pass(setting, platform, positions)
        log.info(
            "training.adapters_per_pass=%s: %s on %s (%d token positions per adapter)",
            setting,
            "all at once" if self.per_pass is None else f"{self.per_pass} per pass",
            platform,
            positions,
        )
        self.teacher_cached = self._choose_teacher()

    def _choose_teacher(self) -> bool:
        """Distillation: cache the teacher's outputs per sample (`distill.teacher`), and if so
        compute them now for this process's distilling cells."""
        distilling = [i for g in self.local for i in g if self.plans[i].objective is not None]
        if not any(p.objective is not None for p in self.plans):
            return False
        section = self.config.distill or DistillSection()
        c = self.model.config
        longest = self.data.context_width - self.data.context_offset + self.data.longest
        if longest > c.max_position_embeddings:
            raise DataError(
                f"distillation: a unit's text and a sample take {longest:,} tokens, more than "
                f"the model's {c.max_position_embeddings:,} positions; cut smaller units "
                "(data.units: chunks with a smaller data.unit_tokens) or shorter samples"
            )
        per_row = self.data.width * (c.vocab_size + len(self._layers()) * c.hidden_size) * 4
        rows = sum(len(self.data.encoded(self.plans[i])) for i in distilling)
        local = np.asarray([rows * per_row], np.int64)
        need = int(np.asarray(multihost_utils.process_allgather(local)).max())
        cached = section.teacher == "cache" or (
            section.teacher == "auto" and need <= section.cache_gb * 2**30
        )
        log.info(
            "distill.teacher=%s: %s (the cache takes %.2f GiB of host memory per process; "
            "distill.cache_gb=%s)",
            section.teacher,
            "outputs cached per sample" if cached else "computed in every step",
            need / 2**30,
            section.cache_gb,
        )
        if cached:
            compute = jax.jit(teacher_outputs, static_argnums=(0, 2, 7))
            graphdef, offset = self.model.graph(), self.data.context_offset
            for i in distilling:
                d = self.plans[i].objective
                self.data.cache_teacher(
                    self.plans[i],
                    lambda t, v, c, cv, d=d: compute(
                        graphdef, self.model.params, d, c, cv, t, v, offset
                    ),
                )
        return cached

    def _layers(self) -> tuple[int, ...]:
        """The hidden states any distilling group's L1 term reads (the cache keeps these)."""
        layers = {i for p in self.plans if p.objective is not None for i in p.objective.layers}
        return tuple(sorted(layers))

    def _check_resumable(self) -> None:
        saved_file = self.run_dir / "config.yaml"
        if not (self.run_dir / "checkpoints").is_dir() or not saved_file.exists():
            raise JaxloraError(
                f"{self.run_dir} has no checkpoint to resume; start a new run without --resume"
            )
        saved = load_config(saved_file)
        for section, key in (("training", "layout"), ("model", "remat"), ("model", "scan_layers")):
            if getattr(getattr(self.config, section), key) == "auto":  # the run's own choice
                value = getattr(getattr(saved, section), key)
                value = list(value) if isinstance(value, tuple) else value
                self.config = self.config.with_value(f"{section}.{key}", value)
        # Before the model loads: every key but the unit axis, which needs the tokenizer.
        self._check_same_results(self.config, ignore=("sweep.data.unit",))

    def _check_same_results(self, config: Config, ignore: Sequence[str] = ()) -> None:
        """The resumed config must give the adapters the run was giving."""
        saved = result_fingerprint(load_config(self.run_dir / "config.yaml"))
        now = result_fingerprint(config)
        changed = sorted(
            k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in ignore
        )
        if changed:
            raise JaxloraError(
                f"cannot resume {self.run_dir}: the config differs in {', '.join(changed)}, which "
                "changes the results; resume with the run's config.yaml or start a new run"
            )

    # -- the pieces of `run`, public so that benchmarks and notebooks can time one step --------

    def init_state(self) -> TrainState:
        """Every adapter's initial weights, optimizer state and bookkeeping, stacked per group."""
        t = self.config.training
        groups = []
        for g in self.groups:
            plans = self.slot_plans(g)
            stack = init_adapters(self.model, [p.lora for p in plans], [p.init_seed for p in plans])
            hyper = Hyper.stack([p.hyper for p in plans])
            keys = jnp.stack([jax.random.key_data(seed_key(p.dropout_seed)) for p in plans])
            live = jnp.asarray([i is not None for i in g.slots])
            groups.append(
                GroupState.create(
                    stack.weights, stack.consts, hyper, keys, live, t.schedule, t.steps
                )
            )
        return self._on_mesh(TrainState(step=jnp.zeros((), jnp.int32), groups=tuple(groups)))

    def _on_mesh(self, state: TrainState) -> TrainState:
        """Every leaf on the job's mesh: per-slot leaves split on `adapter`, the rest replicated;
        leaves already there (the adapter weights) keep their placement. The step returns its
        state in these placements, so its second call reuses the first call's compilation."""

        def place(x, slots):
            if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh:
                return x
            axes = (None,) * x.ndim
            if x.ndim and x.shape[0] == slots:
                axes = ("adapter", *axes[1:])
            host = np.asarray(x)
            sharding = NamedSharding(self.mesh, logical_spec(axes, x.shape, self.mesh))
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: host[idx])

        groups = tuple(
            jax.tree.map(functools.partial(place, slots=len(g.slots)), gs)
            for g, gs in zip(self.groups, state.groups, strict=True)
        )
        return TrainState(step=place(state.step, 0), groups=groups)

    def step_function(self):
        """`(base, state, batches) -> (state, losses)`, jitted once per static configuration."""
        return compile_step(self._step_config())

    def _step_config(self) -> StepConfig:
        m = self.config.model
        graphdefs = tuple(
            self.model.graph(self.placement(g), remat=m.remat, scan_layers=m.scan_layers)
            for g in self.groups
        )
        return StepConfig(
            graphdefs=graphdefs,
            schedule=self.config.training.schedule,
            total_steps=self.config.training.steps,
            use_dropout=any(p.lora.dropout > 0 for p in self.plans),
            spmd_axis_name="adapter",
            passes=tuple(self._passes(g) for g in self.groups),
            segment_window=self.data.longest if self.packed else 0,
            objectives=tuple(self.plans[g.slots[0]].objective for g in self.groups),
            teacher_cached=self.teacher_cached,
            teacher_graphdef=self.model.graph(remat=m.remat, scan_layers=m.scan_layers),
            context_offset=self.data.context_offset,
            scan_layers=m.scan_layers,
            mesh=self.mesh,
        )

    def _passes(self, g: Group) -> int:
        return count_passes(len(g.slots) // self.mesh.shape["adapter"], self.per_pass)

    def _batch_shape(self) -> tuple[int, int]:
        """(rows, positions per row) of one adapter's batch in a step: packed, one row."""
        if self.packed:
            return 1, self.data.packed_length
        return self.config.training.batch_size, self.data.width

    def batches(self, step: int) -> tuple[tuple, int]:
        """Per group, the global (tokens, valid, loss mask) [slots, B, T] arrays of `step`, and
        the number of real (non-padding) tokens this process loaded. Packed (`self.packed`):
        (tokens, valid, loss mask, segment ids) [slots, 1, L], the same rows end to end. A
        distilling group adds each adapter's teacher context and its mask [slots, C]."""
        out, n_tokens = [], 0
        batch = self.data.packed_batch if self.packed else self.data.batch
        for g, local in zip(self.groups, self.local, strict=True):
            n, (B, T) = len(g.slots), self._batch_shape()
            host = [np.zeros((n, B, T), np.int32), np.zeros((n, B, T), bool)]
            host.append(np.zeros((n, B, T), bool))
            if self.packed:
                host.append(np.zeros((n, B, T), np.int32))  # segment ids
            for i in local:
                slot = g.slots.index(i)
                for h, x in zip(host, batch(self.plans[i], step), strict=True):
                    h[slot] = x
                n_tokens += int(host[1][slot].sum())
            if self.plans[g.slots[0]].objective is not None:
                host += self._teacher_inputs(g, local, step)
            out.append(tuple(self.global_array(h) for h in host))
        return tuple(out), n_tokens

    def _teacher_inputs(self, g: Group, local: list[int], step: int) -> list[np.ndarray]:
        """A distilling group's teacher inputs of `step`: the cached outputs of its rows
        ([slots, B, T, V] logits, [slots, B, K, T, D] hidden states with an L1 term), or each
        adapter's context and its mask [slots, C]."""
        n, B, T = len(g.slots), self.config.training.batch_size, self.data.width
        if self.teacher_cached:
            c, layers = self.model.config, self.plans[g.slots[0]].objective.layers
            out = [np.zeros((n, B, T, c.vocab_size), np.float32)]
            if layers:
                out.append(np.zeros((n, B, len(layers), T, c.hidden_size), np.float32))
            get = self.data.teacher_batch
        else:
            C = self.data.context_width
            out = [np.zeros((n, C), np.int32), np.zeros((n, C), bool)]
            get = lambda plan, step: self.data.context_batch(plan)  # noqa: E731
        for i in local:
            for h, x in zip(out, get(self.plans[i], step), strict=True):
                h[g.slots.index(i)] = x
        return out

    # -- run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train (from the last checkpoint with `resume`), export, summarise, evaluate.

        A first SIGTERM or SIGINT saves a checkpoint at the next step boundary and returns
        `{"interrupted_at": step}`; a second one exits at once (Orbax never leaves a partial
        checkpoint behind, so the last good one survives)."""
        state = self.init_state()
        step_fn = self.step_function()
        lock = self._open_run_dir()
        try:
            return self._train(state, step_fn)
        finally:
            if lock is not None:
                lock.release()

    def _open_run_dir(self) -> RunLock | None:
        """Create (or, resuming, reopen) the run directory under process 0's lock."""
        lock = RunLock(self.run_dir) if jax.process_index() == 0 else None
        if lock is not None:
            if not self.resume and self.run_dir.exists() and self.overwrite:
                lock.acquire()  # never delete a run that another job is writing
                shutil.rmtree(self.run_dir)
                lock.release()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if not self.resume:
                atomic_write(self.run_dir / "config.yaml", self.config.to_yaml())
        multihost_utils.sync_global_devices("jaxlora-run-dir")
        return lock

    def _train(self, state: TrainState, step_fn) -> dict[str, Any]:
        t = self.config.training
        ckpt = RunCheckpoints(
            self.run_dir / "checkpoints",
            keep=self.config.checkpoint.keep,
            async_save=self.config.checkpoint.async_,
        )
        meta = {
            "fingerprint": result_fingerprint(self.config),
            "names": [p.name for p in self.plans],
        }
        start, last_losses = 0, {}
        if self.resume:
            state, saved = ckpt.restore_latest(state)
            start = int(saved["step"])
            last_losses = saved.get("losses", {})
            self._truncate_metrics(start)
            log.info("resumed %s at step %d", self.run_dir, start)

        bar = self._progress_bar(start)
        t0, tokens_seen, compile_s = time.perf_counter(), 0, None
        with Interrupts(every=t.log_every) as interrupts:
            for step in range(start, t.steps):
                batches, n_tokens = self.batches(step)
                if compile_s is None:  # the one program of every group, before its first step
                    self._say(bar, f"compiling the training step ({self._what()}) ...")
                state, losses = step_fn(self.model.params, state, batches)
                tokens_seen += n_tokens
                if compile_s is None:
                    jax.block_until_ready(losses)
                    compile_s = time.perf_counter() - t0
                    self._say(bar, f"compiled the training step in {compile_s:.1f} s")
                    t0, tokens_seen = time.perf_counter(), 0
                done = step + 1
                if done % t.log_every == 0 or done == t.steps:
                    last_losses = self.by_name(losses)
                    diverged = self._log_metrics(done, last_losses, state)
                    rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
                    self._update_bar(bar, done, last_losses, len(diverged), rate)
                stop = interrupts.agreed(done)
                if stop or (done % self.config.checkpoint.every_steps == 0 and done < t.steps):
                    last_losses = self.by_name(losses)
                    ckpt.save(done, state, {**meta, "losses": last_losses})
                if stop and done < t.steps:
                    ckpt.wait()
                    ckpt.close()
                    if bar is not None:
                        bar.close()
                    return {"interrupted_at": done, "signal": interrupts.signal_name}
        if bar is not None:
            bar.close()
        ckpt.save(t.steps, state, {**meta, "losses": last_losses})
        ckpt.wait()
        ckpt.close()
        summary = self._finish(state, last_losses)
        results = None
        if self.config.eval is not None:
            from jaxlora.evaluate import evaluate_run

            stacks = [
                AdapterStack(
                    gs.adapter_weights(),
                    gs.consts,
                    tuple(p.lora for p in self.slot_plans(g)),
                    tuple(p.name for p in self.slot_plans(g)),
                )
                for g, gs in zip(self.groups, state.groups, strict=True)
            ]
            results = evaluate_run(self, stacks, self.run_dir, self.config.eval, self.progress)
        memory = None
        if self.config.memory is not None:
            memory = self._evaluate_memory()
        return {
            "summary": summary,
            "results": results,
            "memory": memory,
            "compile_seconds": compile_s,
        }

    def _evaluate_memory(self) -> list[dict[str, Any]] | None:
        if jax.process_count() > 1:
            log.warning(
                "the memory is evaluated in one process: run `jaxlora memory %s` on one host",
                self.run_dir,
            )
            return None
        from jaxlora.memory.evaluate import evaluate_memory

        return evaluate_memory(self, self.run_dir, self.config.memory, self.progress)

    # -- logging -----------------------------------------------------------------------------

    def _log_metrics(self, step: int, losses: dict[str, float], state: TrainState) -> list[str]:
        """Append a line to metrics.jsonl; return the adapters that have diverged so far."""
        diverged_at = self.by_name([gs.diverged_at for gs in state.groups])
        diverged = [name for name, at in diverged_at.items() if at >= 0]
        if jax.process_index() != 0:
            return diverged
        line = {"step": step, "loss": losses}
        if diverged:
            line["diverged"] = diverged
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return diverged

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if jax.process_index() != 0 or not path.exists():
            return
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        atomic_write(path, "".join(ln + "\n" for ln in kept))

    def _what(self) -> str:
        """`4 adapters in 2 groups`: what the training step trains."""
        return f"{plural(len(self.plans), 'adapter')} in {plural(len(self.groups), 'group')}"

    @staticmethod
    def _say(bar, line: str) -> None:
        """A line of progress: above the bar on stderr (as the bar, only with progress), else a
        log record (`jaxlora train -v`)."""
        if bar is None:
            log.info("%s", line)
        else:
            bar.write(f"jaxlora: {line}", file=sys.stderr)

    def _progress_bar(self, start: int):
        if not self.progress or jax.process_index() != 0:
            return None
        from tqdm.auto import tqdm

        n = len(self.plans)
        return tqdm(
            total=self.config.training.steps,
            initial=start,
            unit="step",
            desc=f"training {plural(n, 'adapter')}",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    @staticmethod
    def _update_bar(
        bar, step: int, losses: dict[str, float], n_diverged: int, tokens_per_s: float
    ) -> None:
        if bar is None:
            return
        values = [v for v in losses.values() if math.isfinite(v)]
        bar.n = step
        post = {"tok/s": f"{tokens_per_s:,.0f}"}
        if values:
            post.update(
                loss_min=f"{min(values):.3f}",
                loss_med=f"{statistics.median(values):.3f}",
                loss_max=f"{max(values):.3f}",
            )
        if n_diverged:
            post["diverged"] = n_diverged
        bar.set_postfix(post, refresh=True)

    # -- outputs -----------------------------------------------------------------------------

    def _finish(self, state: TrainState, losses: dict[str, float]) -> list[dict[str, Any]]:
        rows = []
        n_rows = self._gathered_counts(lambda p: len(self.data.encoded(p).tokens))
        diverged_at = self.by_name([gs.diverged_at for gs in state.groups])
        for g, gs in zip(self.groups, state.groups, strict=True):
            stack = self._replicated_stack(g, gs)
            for slot, i in g.real:
                plan = self.plans[i]
                local = self._local_adapter(stack, slot)
                if local is not None:
                    save_peft(
                        self.model, local, 0, self.run_dir / "adapters" / plan.name, overwrite=True
                    )
                at, steps = diverged_at[plan.name], self.config.training.steps
                rows.append(summary_row(plan, n_rows[i], losses, at, self.model.config, steps))
        rows.sort(key=lambda r: r["index"])
        if jax.process_index() == 0:
            write_summary(self.run_dir, rows)
            if self.units:
                write_units(self.run_dir, self.plans, self.units)
            write_documents(self.run_dir, self.plans)
        multihost_utils.sync_global_devices("jaxlora-finish")
        return rows

    def _gathered_counts(self, count) -> np.ndarray:
        local = np.full(len(self.plans), -1, np.int64)
        for i in {i for g in self.local for i in g}:
            local[i] = count(self.plans[i])
        return (
            np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(self.plans)).max(0)
        )

    def _replicated_stack(self, g: Group, gs: GroupState) -> AdapterStack:
        """The group's stack sharded only on `adapter`, so each process holds whole adapters."""
        spec = NamedSharding(self.mesh, PartitionSpec("adapter"))
        weights, consts = jax.jit(lambda w, c: (gs.by_layer.split(w), c), out_shardings=spec)(
            gs.weights, gs.consts
        )
        configs = tuple(p.lora for p in self.slot_plans(g))
        names = tuple(
            self.plans[i].name if i is not None else f"_pad{s}" for s, i in enumerate(g.slots)
        )
        return AdapterStack(weights, consts, configs, names)

    @staticmethod
    def _local_adapter(stack: AdapterStack, slot: int) -> AdapterStack | None:
        """Adapter `slot` as a one-adapter host stack, on the one process that writes it (the
        holder of its first replica); None elsewhere."""

        def host(x):
            for shard in x.addressable_shards:
                rows = range(*shard.index[0].indices(x.shape[0]))
                if shard.replica_id == 0 and slot in rows:
                    return np.asarray(shard.data)[slot - rows.start][None]
            return None

        weights, consts = (jax.tree.map(host, t) for t in (stack.weights, stack.consts))
        if any(x is None for x in jax.tree.leaves(weights, is_leaf=lambda x: x is None)):
            return None
        return AdapterStack(weights, consts, (stack.configs[slot],), (stack.names[slot],))
