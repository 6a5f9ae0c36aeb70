"""A TPU program traced on this CPU host takes the TPU's paths, and its layout tiles on TPU.

Needs libtpu (`jax[tpu]`: compile-only TPU devices from `jax.experimental.topologies`, no TPU);
skipped without it. The step is the tiny model's, built as benchmarks/tpu_fit.py builds the
8B one (scanned, bf16, dropout 0.1), over a 2/4/1 mesh of TPU v5e devices and over one of this
host's CPU devices. In a venv with `jax[tpu]` and no torch (tests/conftest.py needs it):

    JAX_PLATFORMS=cpu python -m pytest -m tpu_aot tests/test_tpu_layout.py --noconftest
"""

from __future__ import annotations

import importlib.util
import re

import jax
import numpy as np
import pytest

from benchmarks.tpu_fit import abstract_step, tpu_devices
from jaxlora.sharding import make_mesh

pytestmark = [
    pytest.mark.tpu_aot,  # deselected in the main run (pyproject); run apart: -m tpu_aot
    pytest.mark.skipif(
        importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install jax[tpu])"
    ),
]


def _step(devices, sizes=(2, 4, 1)):
    mesh = make_mesh(*sizes, devices=devices)
    return abstract_step("tiny-llama", mesh, adapters=4, batch=4, seq=16, scan=True)


def test_a_tpu_mesh_takes_no_cpu_path_and_a_cpu_mesh_does():
    """The CPU-only paths of models/layers.py: bf16 products summed in float32 through
    `_summed_in_f32`, and the barrier that keeps a LoRA factor's gradient in its [r, in]
    layout. The step has none of its own (its AdamW update works on each layer stack)."""
    jaxprs = {}
    for name, devices, sizes in (
        ("tpu", tpu_devices("v5e:2x4"), (2, 4, 1)),
        ("cpu", jax.devices("cpu")[:1], (1, 1, 1)),  # (the AOT venv runs without conftest)
    ):
        step, inputs = _step(devices, sizes)
        jaxprs[name] = str(jax.make_jaxpr(step)(*inputs))
    assert "_summed_in_f32" not in jaxprs["tpu"]
    assert "optimization_barrier" not in jaxprs["tpu"]
    assert "_summed_in_f32" in jaxprs["cpu"]
    assert "optimization_barrier" in jaxprs["cpu"]


def test_the_tpu_step_compiles_with_no_tiny_trailing_dimension():
    """Compiled for v5e: fits, and no integer buffer of the dropout hash ends in a dimension of
    2 (a u32 split into a uint16 pair: TPU pads that dimension to 128, 64x its size). The keys
    themselves end in 2 ([A, 2], [L, 7, 2] split per layer and projection) but are tiny; a
    mask's words are activation-sized (16 positions x 32 words and more here)."""
    step, inputs = _step(tpu_devices("v5e:2x4"))
    compiled = step.lower(*inputs).compile()
    mem = compiled.memory_analysis()
    # (the tiny step may need no temporaries outside the chip's scoped memory: 0 is a fit)
    assert mem.argument_size_in_bytes > 0 and mem.temp_size_in_bytes < 2**30
    pairs = [
        shape
        for shape in re.findall(r"u(?:8|16|32)\[([\d,]+)\]", compiled.as_text())
        if shape.endswith(",2") and np.prod([int(d) for d in shape.split(",")]) >= 256
    ]
    assert not pairs, f"buffers with a trailing pair: {sorted(set(pairs))[:5]}"
