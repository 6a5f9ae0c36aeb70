"""Built-in model presets: architectures with random weights and a locally trained tokenizer.

`tiny-*` presets make the quickstart and tests run anywhere without a download. The
`*-shape` presets carry the real architectures of the study's models (random weights, a
small local tokenizer whose ids fit the real vocabulary) for planning and benchmarks.
"""

from __future__ import annotations

import dataclasses

from jaxlora.models.config import ModelConfig, RopeScaling
from jaxlora.models.tokenizer import TokenizerStyle


@dataclasses.dataclass(frozen=True)
class Preset:
    config: ModelConfig
    tokenizer_style: TokenizerStyle
    tokenizer_vocab: int
    seed: int = 0
    description: str = ""


def _tiny(model_type: str, **overrides) -> ModelConfig:
    base = dict(
        model_type=model_type,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
    )
    return ModelConfig(**{**base, **overrides})


_LLAMA3_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_LLAMA_SPECIAL = dict(bos_token_id=0, eos_token_ids=(4,), pad_token_id=5)
_QWEN_SPECIAL = dict(bos_token_id=None, eos_token_ids=(2,), pad_token_id=0)

PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset(
        _tiny("llama", **_LLAMA_SPECIAL),
        "llama",
        512,
        description="2-layer 64-wide Llama, GQA, tied embeddings (tests)",
    ),
    "tiny-qwen3": Preset(
        _tiny("qwen3", **_QWEN_SPECIAL),
        "qwen",
        512,
        description="2-layer 64-wide Qwen3 with q/k norm (tests)",
    ),
    "small-llama": Preset(
        _tiny(
            "llama",
            hidden_size=256,
            intermediate_size=1024,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            head_dim=32,
            tie_word_embeddings=False,
            **_LLAMA_SPECIAL,
        ),
        "llama",
        512,
        description="4-layer 256-wide Llama, GQA, untied embeddings (CPU benchmarks)",
    ),
    "llama-3.1-8b-shape": Preset(
        ModelConfig(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_SCALING,
            max_position_embeddings=131072,
            **_LLAMA_SPECIAL,
        ),
        "llama",
        512,
        description="Llama-3.1-8B architecture, random weights",
    ),
    "llama-3.2-1b-shape": Preset(
        ModelConfig(
            model_type="llama",
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=dataclasses.replace(_LLAMA3_SCALING, factor=32.0),
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            **_LLAMA_SPECIAL,
        ),
        "llama",
        512,
        description="Llama-3.2-1B architecture, random weights",
    ),
    "qwen3-0.6b-shape": Preset(
        ModelConfig(
            model_type="qwen3",
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_layers=28,
            num_heads=16,
            num_kv_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
            qk_norm=True,
            **_QWEN_SPECIAL,
        ),
        "qwen",
        512,
        description="Qwen3-0.6B architecture, random weights",
    ),
    "qwen3-8b-shape": Preset(
        ModelConfig(
            model_type="qwen3",
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_layers=36,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            qk_norm=True,
            **_QWEN_SPECIAL,
        ),
        "qwen",
        512,
        description="Qwen3-8B architecture, random weights",
    ),
}


def shape_preset_for(model_id: str) -> str | None:
    """The `*-shape` preset with a hub model's architecture, matched on the model's name
    ('meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b-shape'), or None."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1].lower().removeprefix("meta-")
    bases = [p.removesuffix("-shape") for p in PRESETS if p.endswith("-shape")]
    found = [b for b in bases if name == b or name.startswith(b + "-")]
    return max(found, key=len) + "-shape" if found else None
