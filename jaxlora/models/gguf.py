"""GGUF files (llama.cpp's format) as checkpoints: Llama, Qwen2 and Qwen3, quantised or not.

A GGUF file holds the architecture and the tokenizer (with its chat template) as metadata and
the weights as tensors in llama.cpp's names, many of them quantised in blocks. Reading one
needs the `gguf` package only (no torch): each tensor is dequantised to float32 by gguf's own
numpy kernels (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants and the IQ types it
implements), renamed to transformers' names, and read into its device layout exactly as a
safetensors tensor is (`jaxlora.models.convert`).

Two things llama.cpp changes on the way in are undone here:
- The rows of Llama's q and k projections are permuted: llama.cpp's rotary embedding pairs
  neighbouring features of a head where transformers pairs the two halves. Qwen2 and Qwen3 are
  converted without the permutation (llama.cpp runs them with the halves pairing).
- Llama 3's frequency-dependent RoPE scaling is stored as a `rope_freqs` tensor of per-frequency
  factors, not as its four numbers. The numbers are recovered by matching the tensor against
  the published Llama 3 settings; a tensor that matches none is refused.

The tokenizer is built by transformers' GGUF tokenizer support from metadata read here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlora.models.config import ConfigError, ModelConfig, RopeScaling
from jaxlora.models.convert import CheckpointError, Path_, _first_line, hf_name

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "qwen2", "qwen3")

# transformers' name (after the "model." prefix of a decoder) -> llama.cpp's name.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Tensors a supported file may hold that the decoder takes from elsewhere (rope_freqs: the
# config's RoPE scaling) or does not use.
_KNOWN_EXTRA = {"rope_freqs.weight"}

# Llama 3's published RoPE scalings (low_freq_factor, high_freq_factor, original context); the
# factor itself is the largest entry of `rope_freqs`.
_LLAMA3_ROPE = ((1.0, 4.0, 8192),)


def gguf_path(path_or_id: str | os.PathLike) -> Path | None:
    """The GGUF file a model argument names: a file called *.gguf, or any file that starts
    with GGUF's magic bytes (`GGUFFile` then says what is wrong with a bad one), else None."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        with path.open("rb") as f:
            if path.suffix.lower() == ".gguf" or f.read(4) == GGUF_MAGIC:
                return path
    return None


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a transformers tensor name."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.match(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise CheckpointError(f"no GGUF tensor corresponds to {name}")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


class GGUFFile:
    """An open GGUF file: its metadata, tensors (dequantised on demand) and model config."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, KeyError, numpy errors on bad files
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file ({_first_line(e)})"
            ) from None
        self._reader = reader
        self.tensors = {t.name: t for t in reader.tensors}
        self._check_complete()
        self.architecture = str(self.field("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"jaxlora reads {', '.join(ARCHITECTURES)}"
            )
        self._check_types()

    def _check_complete(self) -> None:
        """A truncated file: the reader maps tensors lazily and would read past the end later."""
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file: tensor {t.name} ends at byte "
                    f"{t.data_offset + t.n_bytes:,}, the file has {size:,}"
                )

    def _check_types(self) -> None:
        """Every quantisation in the file is one the installed gguf package dequantises: tried
        on one row of a tensor of each type, before any work."""
        import gguf

        first = {}
        for t in self._reader.tensors:
            first.setdefault(t.tensor_type, t)
        unsupported = []
        for qtype, t in first.items():
            try:
                gguf.quants.dequantize(t.data[:1], qtype)
            except NotImplementedError:
                unsupported.append(qtype.name)
        if unsupported:
            raise CheckpointError(
                f"{self.path}: quantisation {', '.join(sorted(unsupported))} cannot be dequantised "
                "by the installed gguf package; re-quantise the file (e.g. Q8_0 or a K-quant)"
            )

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (a list for arrays), or `default` when the file lacks it."""
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantised to float32, in transformers' orientation ([out, in])."""
        import gguf

        t = self.tensors[name]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # a corrupt block layout surfaces here as a numpy error
            raise CheckpointError(f"{self.path}: tensor {name}: {_first_line(e)}") from None
        # ggml lists dimensions fastest first; numpy's order is the reverse
        return np.asarray(array, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))

    # ---------------------------------------------------------------------------------------
    # the model config

    def model_config(self) -> ModelConfig:
        a = self.arch_field
        need = {
            "block_count": a("block_count"),
            "embedding_length": a("embedding_length"),
            "feed_forward_length": a("feed_forward_length"),
            "attention.head_count": a("attention.head_count"),
        }
        missing = [k for k, v in need.items() if v is None]
        if missing:
            raise CheckpointError(
                f"{self.path}: GGUF metadata lacks {', '.join(f'{self.architecture}.{k}' for k in missing)}"
            )
        if "token_embd.weight" not in self.tensors:
            raise CheckpointError(f"{self.path}: GGUF file has no token_embd.weight tensor")
        scaling_type = a("rope.scaling.type")
        if scaling_type not in (None, "none"):
            raise CheckpointError(
                f"{self.path}: RoPE scaling {scaling_type!r} is not supported; jaxlora implements "
                "the default and Llama 3's"
            )
        hidden, heads = int(need["embedding_length"]), int(need["attention.head_count"])
        head_dim = int(a("attention.key_length") or hidden // heads)
        theta = _decimal(a("rope.freq_base", 10000.0))
        eos = [self.field(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
        try:
            return ModelConfig(
                model_type=self.architecture,
                vocab_size=int(self.tensors["token_embd.weight"].shape[-1]),
                hidden_size=hidden,
                intermediate_size=int(need["feed_forward_length"]),
                num_layers=int(need["block_count"]),
                num_heads=heads,
                num_kv_heads=int(a("attention.head_count_kv") or heads),
                head_dim=head_dim,
                rms_norm_eps=_decimal(a("attention.layer_norm_rms_epsilon", 1e-6)),
                rope_theta=theta,
                rope_scaling=self._rope_scaling(theta, head_dim),
                max_position_embeddings=int(a("context_length", 2048)),
                tie_word_embeddings="output.weight" not in self.tensors,
                qkv_bias=self.architecture == "qwen2",
                qk_norm=self.architecture == "qwen3",
                bos_token_id=_int_or_none(self.field("tokenizer.ggml.bos_token_id")),
                eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
                pad_token_id=_int_or_none(self.field("tokenizer.ggml.padding_token_id")),
                name_or_path=str(self.path),
            )
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def _rope_scaling(self, theta: float, head_dim: int) -> RopeScaling | None:
        if "rope_freqs.weight" not in self.tensors:
            return None
        factors = self.tensor("rope_freqs.weight").reshape(-1)
        found = llama3_scaling_from_factors(factors, theta, head_dim)
        if found is None:
            raise CheckpointError(
                f"{self.path}: its rope_freqs tensor matches no Llama 3 RoPE scaling jaxlora knows"
            )
        return found

    # ---------------------------------------------------------------------------------------
    # tokenizer

    def tokenizer(self):
        """The file's tokenizer, chat template included, or None when it carries none."""
        if self.field("tokenizer.ggml.model") is None:
            return None
        try:
            from transformers import PreTrainedTokenizerFast
            from transformers.integrations.gguf import (
                GGUF_TOKENIZER_MAPPING,
                convert_gguf_tokenizer,
            )
        except ImportError as e:
            raise CheckpointError(
                f"{self.path}: the installed transformers cannot build a tokenizer from GGUF "
                f"metadata ({_first_line(e)}); upgrade transformers"
            ) from None
        groups = {
            group: {
                name: self.field(f"tokenizer.{key}")
                for key, name in renames.items()
                if f"tokenizer.{key}" in self._reader.fields
            }
            for group, renames in GGUF_TOKENIZER_MAPPING.items()
        }
        tokens, config = groups["tokenizer"]["tokens"], groups["tokenizer_config"]
        for name in ("bos", "eos", "unk", "pad"):
            key = {"unk": "unknown", "pad": "padding"}.get(name, name)
            token_id = self.field(f"tokenizer.ggml.{key}_token_id")
            config[f"{name}_token"] = tokens[token_id] if token_id is not None else None
        try:
            backend, extra = convert_gguf_tokenizer(self.architecture, groups["tokenizer"])
        except Exception as e:  # transformers raises several types for vocabularies it lacks
            raise CheckpointError(
                f"{self.path}: transformers cannot build this file's tokenizer ({_first_line(e)})"
            ) from None
        return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def llama3_scaling_from_factors(
    factors: np.ndarray, theta: float, head_dim: int
) -> RopeScaling | None:
    """The Llama 3 RoPE scaling whose per-frequency factors (llama.cpp's `rope_freqs`: 1 for
    high frequencies, `factor` for low ones, a smooth blend between) are `factors`, or None."""
    if factors.shape != (head_dim // 2,):
        return None
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    for low, high, context in _LLAMA3_ROPE:
        smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
        expected = 1.0 / ((1 - smooth) / factor + smooth)
        # the tensor is float32: its entries are the float64 values rounded once
        if np.allclose(factors, expected, rtol=1e-6, atol=0):
            return RopeScaling(factor, low, high, context)
    return None


def unpermute_qk(w_OI: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Llama q or k projection ([out, in])."""
    out, rest = w_OI.shape[0], w_OI.shape[1:]
    return w_OI.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_OI.shape)


def hf_tensor(gg: GGUFFile, name: str, config: ModelConfig) -> np.ndarray:
    """The float32 tensor transformers names `name`, read from the GGUF file."""
    stored = gguf_name(name)
    if stored not in gg.tensors:
        raise CheckpointError(f"{gg.path}: tensor {stored} (for {name}) is missing")
    array = gg.tensor(stored)
    if config.model_type == "llama" and stored.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_heads if ".attn_q." in stored else config.num_kv_heads
        array = unpermute_qk(array, heads)
    return array


def load_gguf_params(
    gg: GGUFFile,
    config: ModelConfig,
    abstract: nnx.State,
    shardings: Callable[[Path_, Any], jax.sharding.Sharding],
) -> nnx.State:
    """The base parameters of `abstract` (an eval_shape'd state), read from a GGUF file: each
    tensor dequantised once on the host and placed shard by shard."""
    flat, used = [], set(_KNOWN_EXTRA)
    for path, var in nnx.to_flat_state(abstract):
        name, transpose = hf_name(path)
        used.add(gguf_name(name))
        array = hf_tensor(gg, name, config)
        if transpose:
            array = array.T
        want = var.get_value()
        if array.shape != tuple(want.shape):
            raise CheckpointError(
                f"{gg.path}: tensor {gguf_name(name)} has shape {array.shape}, the metadata "
                f"implies {tuple(want.shape)}"
            )
        array = array.astype(np.dtype(want.dtype))
        flat.append(
            (
                path,
                var.replace(
                    jax.make_array_from_callback(
                        want.shape, shardings(path, var), lambda idx, a=array: a[idx]
                    )
                ),
            )
        )
    unknown = sorted(set(gg.tensors) - used)
    if unknown:
        raise CheckpointError(
            f"{gg.path}: {len(unknown)} tensors the decoder does not use "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})"
        )
    return nnx.from_flat_state(flat)


def _decimal(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not
    9.99999997e-07): the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
