"""The memory on a mesh of 8 devices answers as on one: its prompts are placed whole on every
device of the job's mesh and every decoding program (base, routed adapters, merges, mixture)
is traced for that mesh, which is how `jaxlora plan --aot` compiles them (`aot_memory`)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.config import MemorySection, load_config
from jaxlora.job import Job
from jaxlora.memory.compose import parse_method
from jaxlora.memory.evaluate import MemoryEvaluator
from jaxlora.memory.library import load_libraries

METHODS = ["base", "oracle", "bm25@2/ties", "bm25@2/cat", "bm25@2/mixture"]


class _Bar:
    def update(self, n):
        pass


def _answers(memory_run, devices, overrides=()):
    job = Job(load_config(memory_run / "config.yaml", overrides), devices)
    (library,) = load_libraries(job, memory_run)
    section = MemorySection(methods=METHODS, max_new_tokens=8, batch_size=4)
    ev = MemoryEvaluator(job, section, library, memory_run)
    prompts = ev.prompts([None] * len(ev.questions))
    answers = {m: ev.decode(parse_method(m), prompts, _Bar()) for m in METHODS}
    return ev, prompts, answers


def test_memory_on_eight_devices_answers_as_on_one(memory_run):
    _, _, one = _answers(memory_run, jax.devices()[:1])
    ev, prompts, eight = _answers(
        memory_run, jax.devices()[:8], ["mesh.adapter=2", "mesh.fsdp=4", "mesh.tensor=1"]
    )
    assert dict(ev.job.mesh.shape) == {"adapter": 2, "fsdp": 4, "tensor": 1}
    tokens, mask = ev._pack(prompts[:4], 64)
    replicated = NamedSharding(ev.job.mesh, PartitionSpec())
    assert tokens.sharding == replicated and mask.sharding == replicated
    # Greedy tokens: fsdp splits the base weights' reductions over 4 devices, which moves the
    # float32 logits by rounding (~1e-6 relative); an argmax changes only where the top two
    # logits of a trained model are that close, which none of these few hundred choices is.
    assert eight == one
    assert len({tuple(map(tuple, a)) for a in one.values()}) > 1  # the methods differ
