"""`Model`: a decoder's frozen parameters, its config and tokenizer, and jitted forwards.

The NNX module is only a description here: `Model` keeps the base parameters as an
`nnx.State` and merges them with a graph definition inside each jitted function, so forward
passes are pure functions of pytrees (base broadcast, adapters stacked; see `jaxlora.lora`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxlora.errors import LoRAError
from jaxlora.fsutil import staged_dir
from jaxlora.models import convert, packaged
from jaxlora.models.config import ConfigError, ModelConfig
from jaxlora.models.gguf import GGUFFile, gguf_path, load_gguf_params
from jaxlora.models.presets import PRESETS, Preset, shape_preset_for
from jaxlora.models.tokenizer import train_tokenizer
from jaxlora.models.transformer import (
    LoRAPlacement,
    Remat,
    Transformer,
    abstract_module,
)
from jaxlora.sharding import variable_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def count_params(state: nnx.State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, base, tokens_BT, mask_BT, positions_BT):
    module = nnx.merge(graphdef, nnx.State({}), nnx.State({}), base)
    return module(tokens_BT, mask_BT, positions_BT=positions_BT)[0]


def stack_forward(
    graphdef,
    base: nnx.State,
    weights: nnx.State,
    consts: nnx.State,
    tokens_ABT: jax.Array,
    mask_ABT: jax.Array,
    positions_ABT: jax.Array | None = None,
    rng_A: jax.Array | None = None,
    *,
    spmd_axis_name: str | None = None,
    return_hidden: bool = False,
    lora_stacks: dict[tuple, jax.Array] | None = None,
) -> jax.Array:
    """Logits [A, B, T, V] (or hidden states) of A adapters, each on its own tokens: `vmap` over
    the stacked LoRA states with the base broadcast. `lora_stacks` ([A, L, ...]): the adapters'
    layer stacks, for a scanned model to read (`Transformer.__call__`)."""

    def one(w, c, stacks, tokens, mask, positions, rng):
        module = nnx.merge(graphdef, w, c, base)
        return module(
            tokens,
            mask,
            positions_BT=positions,
            rng=rng,
            return_hidden=return_hidden,
            lora_stacks=stacks,
        )[0]

    in_axes = (0, 0, 0, 0, 0, None if positions_ABT is None else 0, None if rng_A is None else 0)
    return jax.vmap(one, in_axes=in_axes, spmd_axis_name=spmd_axis_name)(
        weights, consts, lora_stacks, tokens_ABT, mask_ABT, positions_ABT, rng_A
    )


@functools.partial(jax.jit, static_argnames=("graphdefs",))
def _groups_forward(graphdefs, base, stacks, tokens, masks, positions):
    return tuple(
        stack_forward(g, base, s.weights, s.consts, t, m, p)
        for g, s, t, m, p in zip(graphdefs, stacks, tokens, masks, positions, strict=True)
    )


@dataclasses.dataclass
class Model:
    """A loaded decoder: `model(input_ids, attention_mask=mask)` -> float32 logits [B, T, V]."""

    config: ModelConfig
    params: nnx.State
    tokenizer: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mesh: Mesh | None = None

    def graph(
        self, lora: LoRAPlacement | None = None, remat: Remat = "none", scan_layers: bool = False
    ) -> nnx.GraphDef:
        """The module's graph definition: merge it with (LoRA weights, LoRA consts, params).
        `scan_layers` runs the layers as one `lax.scan` (compile time flat in depth) over the
        same parameter tree."""
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        return abstract_module(c, lora, dt, pdt, remat, scan_layers)[0]

    def __call__(self, input_ids, attention_mask=None, *, positions=None, adapters=None):
        """Logits of `input_ids` [B, T]; with `adapters` (a `jaxlora.lora.AdapterStack` of A, or a
        list of stacks), input [A, B, T] -> [A, B, T, V]."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        mask = (
            jnp.ones(input_ids.shape, bool)
            if attention_mask is None
            else jnp.asarray(attention_mask, bool)
        )
        if adapters is not None:
            return self._stacked_logits(adapters, input_ids, mask, positions)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
        return _forward(self.graph(), self.params, input_ids, mask, positions)

    def _stacked_logits(self, adapters, input_ids_ABT, mask_ABT, positions_ABT) -> jax.Array:
        """Logits [A, B, T, V] of every adapter, all groups in one compiled call (adapters of a
        list of stacks are numbered in order)."""
        stacks = tuple(adapters) if isinstance(adapters, Sequence) else (adapters,)
        total = sum(len(s) for s in stacks)
        if input_ids_ABT.ndim != 3 or input_ids_ABT.shape[0] != total:
            raise LoRAError(
                f"with {total} adapters, input_ids must be [{total}, batch, time]; got "
                f"shape {tuple(input_ids_ABT.shape)}"
            )
        bounds = list(itertools.pairwise(np.cumsum([0] + [len(s) for s in stacks])))

        def cut(x):
            return None if x is None else tuple(x[a:b] for a, b in bounds)

        graphdefs = tuple(self.graph(s.placement) for s in stacks)
        outs = _groups_forward(
            graphdefs,
            self.params,
            stacks,
            cut(input_ids_ABT),
            cut(mask_ABT),
            cut(positions_ABT) or (None,) * len(stacks),
        )
        return jnp.concatenate(outs, axis=0)

    @property
    def num_params(self) -> int:
        return count_params(self.params)

    def save_hf(self, out_dir: str | os.PathLike) -> None:
        """Write the base model as a transformers checkpoint (config, safetensors, tokenizer)."""
        convert.save_hf_checkpoint(out_dir, self.config, self.params, self.tokenizer)


def init_params(
    config: ModelConfig, seed: int = 0, param_dtype=jnp.float32, mesh: Mesh | None = None
) -> nnx.State:
    """Random base parameters (normal(0.02) projections, unit norms), created in place on the mesh."""
    _, _, _, abstract = abstract_module(config, None, param_dtype, param_dtype)
    shardings = jax.tree.map(
        lambda v: variable_sharding(v, mesh),
        abstract,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        module = Transformer(
            config, dtype=param_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)
        )
        return nnx.state(module, nnx.Param)

    return init()


def from_preset(name: str, dtype="float32", *, param_dtype=None, mesh: Mesh | None = None) -> Model:
    """A built-in preset: its architecture, random weights of its seed, a local tokenizer."""
    preset = PRESETS[name]
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) if param_dtype is not None else dtype
    params = init_params(preset.config, preset.seed, param_dtype, mesh)
    tokenizer = train_tokenizer(preset.tokenizer_style, preset.tokenizer_vocab)
    config = preset.config.replace(name_or_path=name)
    return Model(config, params, tokenizer, dtype, param_dtype, mesh)


def _preset(path_or_id: str | os.PathLike) -> Preset | None:
    """The built-in preset a model argument names (a local path of that name wins), or None."""
    if str(path_or_id) in PRESETS and not Path(path_or_id).exists():
        return PRESETS[str(path_or_id)]
    return None


def _packaged_files(name: str) -> tuple[Path, Path]:
    """(the installed GGUF file, the directory of its converted copy) of a packaged model."""
    gguf_file, version = packaged.locate(name)
    return gguf_file, packaged.cache_dir(name, version)


def _packaged_dir(name: str) -> Path:
    """The converted copy of a packaged model, converting its GGUF file on first use."""
    gguf_file, out = _packaged_files(name)
    if not convert.is_orbax_dir(out):
        logging.getLogger(__name__).info(
            "converting %s (%s) once into %s", name, gguf_file.name, out
        )
        model = load_pretrained(gguf_file, "float32")
        with staged_dir(out, overwrite=True) as tmp:
            convert.save_orbax(tmp, None, model.config, model.params, model.tokenizer)
    return out


def model_config(path_or_id: str | os.PathLike) -> ModelConfig:
    """The architecture of a model argument without reading its weights."""
    if preset := _preset(path_or_id):
        return preset.config
    if name := packaged.packaged_name(path_or_id):
        gguf_file, out = _packaged_files(name)
        if convert.is_orbax_dir(out):
            return ModelConfig.from_file(out / "config.json").replace(name_or_path=name)
        return GGUFFile(gguf_file).model_config().replace(name_or_path=name)
    if gguf_file := gguf_path(path_or_id):
        return GGUFFile(gguf_file).model_config()
    path = Path(path_or_id).expanduser()
    if path.exists():
        return ModelConfig.from_file(convert.resolve_model_dir(path) / "config.json")
    from huggingface_hub import hf_hub_download

    # `jaxlora plan` needs the architecture only: a `*-shape` preset has it, without the hub.
    repo_id = str(path_or_id)
    preset = shape_preset_for(repo_id)
    if preset:
        hint = f"to plan without it, --set model.path={preset} (the same architecture)"
    else:
        shapes = ", ".join(p for p in PRESETS if p.endswith("-shape"))
        hint = f"to plan without it, --set model.path=<a *-shape preset: {shapes}>"
    config_file = convert.hub_fetch(
        repo_id, lambda **kw: hf_hub_download(repo_id, "config.json", **kw), hint
    )
    return ModelConfig.from_file(config_file)


def local_tokenizer(path_or_id: str | os.PathLike, config: ModelConfig):
    """The tokenizer of a model argument without reading its weights or asking the hub: a
    preset's own (a `*-shape` preset's is a small stand-in, not the real model's), a local
    directory's files, or None (a hub id, or a directory without tokenizer files)."""
    if preset := _preset(path_or_id):
        return train_tokenizer(preset.tokenizer_style, preset.tokenizer_vocab)
    if name := packaged.packaged_name(path_or_id):
        return load_tokenizer(_packaged_dir(name), config)
    if gguf_file := gguf_path(path_or_id):
        return check_tokenizer(GGUFFile(gguf_file).tokenizer(), config, gguf_file)
    path = Path(path_or_id).expanduser()
    return load_tokenizer(convert.resolve_model_dir(path), config) if path.exists() else None


def load_pretrained(
    path_or_id: str | os.PathLike,
    dtype: str | Any = "float32",
    *,
    param_dtype: str | Any | None = None,
    mesh: Mesh | None = None,
    tokenizer: bool = True,
) -> Model:
    """Load a model from a Hugging Face directory, a hub id, a GGUF file, a `jaxlora convert`
    directory, a built-in preset name or a packaged trained model (`smollm2-135m`).

    `dtype` is the compute dtype and, unless `param_dtype` is given, the storage dtype of the
    base weights. With a `mesh`, weights are read straight into their sharded layout.
    """
    if _preset(path_or_id):
        return from_preset(str(path_or_id), dtype, param_dtype=param_dtype, mesh=mesh)
    dtype = parse_dtype(dtype)
    param_dtype = parse_dtype(param_dtype) if param_dtype is not None else dtype

    def sharding(path, var):
        return variable_sharding(var, mesh)

    if gguf_file := gguf_path(path_or_id):
        gg = GGUFFile(gguf_file)
        config = gg.model_config()
        _, _, _, abstract = abstract_module(config, None, dtype, param_dtype)
        params = load_gguf_params(gg, config, abstract, sharding)
        tok = check_tokenizer(gg.tokenizer(), config, gguf_file) if tokenizer else None
        return Model(config, params, tok, dtype, param_dtype, mesh)
    name = packaged.packaged_name(path_or_id)
    model_dir = _packaged_dir(name) if name else convert.resolve_model_dir(path_or_id)
    config = ModelConfig.from_file(model_dir / "config.json")
    if name:
        config = config.replace(name_or_path=name)
    _, _, _, abstract = abstract_module(config, None, dtype, param_dtype)

    if convert.is_orbax_dir(model_dir):
        params = convert.load_orbax_params(model_dir, abstract, sharding)
    else:
        params = convert.load_hf_params(model_dir, abstract, sharding)
    tok = load_tokenizer(model_dir, config) if tokenizer else None
    return Model(config, params, tok, dtype, param_dtype, mesh)


def load_tokenizer(model_dir: Path, config: ModelConfig):
    """The directory's tokenizer (None when it has none), checked against the model's vocab."""
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return check_tokenizer(AutoTokenizer.from_pretrained(model_dir), config, model_dir)


def check_tokenizer(tok, config: ModelConfig, source: Path):
    """`tok` (None passes through), refused when its ids do not fit the model's vocabulary."""
    if tok is None:
        return None
    V, fix = config.vocab_size, "use the tokenizer that belongs to this checkpoint"
    # A base vocabulary larger than the table is another model's tokenizer.
    if tok.vocab_size > V:
        raise convert.CheckpointError(
            f"{source}: the tokenizer's base vocabulary has {tok.vocab_size} tokens but the "
            f"model's vocab_size is {V}; {fix}"
        )
    # Every run feeds BOS, EOS and padding to the model.
    for name in ("bos", "eos", "pad"):
        i = getattr(tok, f"{name}_token_id")
        if i is not None and i >= V:
            raise convert.CheckpointError(
                f"{source}: the tokenizer's {name}_token {tok.convert_ids_to_tokens(i)!r} has "
                f"id {i}, outside the model's vocab_size {V}; {fix}"
            )
    # Added tokens beyond the table are harmless until used (Qwen's tokenizer class adds
    # <|endoftext|> on load): warn, as transformers does; encoding refuses them (data.encode).
    outside = sorted(i for i in tok.added_tokens_decoder if i >= V)
    if outside:
        names = ", ".join(repr(tok.added_tokens_decoder[i].content) for i in outside[:5])
        logging.getLogger(__name__).warning(
            f"{source}: {len(outside)} added tokens of the tokenizer ({names}"
            f"{', ...' if len(outside) > 5 else ''}) lie outside the model's vocab_size {V}; "
            "a run whose data or chat template uses them is refused"
        )
    return tok
