"""Tiny random Hugging Face checkpoints written by transformers itself (the reference side).

Weights are random with a larger spread than transformers' default init, and norm weights
and biases are perturbed away from 1 and 0, so that a wrong norm, bias, rotary convention or
head layout shows up as a large logit difference rather than a rounding error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from jaxlora.models.tokenizer import train_tokenizer

_TOKENIZERS: dict[str, object] = {}


def tokenizer_for(family: str):
    style = "llama" if family == "llama" else "qwen"
    if style not in _TOKENIZERS:
        _TOKENIZERS[style] = train_tokenizer(style, 512)
    return _TOKENIZERS[style]


def hf_config(
    family: str,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie: bool = False,
    rope_scaling: bool = True,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 512,
):
    tok = tokenizer_for(family)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    if family == "llama":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return LlamaConfig(
            rope_theta=10000.0, rope_scaling=scaling if rope_scaling else None, **common
        )
    if family == "qwen2":
        return Qwen2Config(rope_theta=10000.0, **common)
    if family == "qwen3":
        return Qwen3Config(rope_theta=10000.0, head_dim=hidden // num_heads, **common)
    raise ValueError(family)


def make_hf_checkpoint(
    out_dir: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_kw,
) -> Path:
    """Write config.json, safetensors and a locally trained tokenizer to `out_dir`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **config_kw), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kw)
    tokenizer_for(family).save_pretrained(out_dir)
    return Path(out_dir)


def load_hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
