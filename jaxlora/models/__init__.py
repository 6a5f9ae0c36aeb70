"""Decoders (Llama 3.x, Qwen2/2.5, Qwen3), their configs, checkpoints and presets."""

from jaxlora.models.config import ConfigError, ModelConfig
from jaxlora.models.convert import CheckpointError
from jaxlora.models.model import Model, load_pretrained
from jaxlora.models.presets import PRESETS
from jaxlora.models.transformer import KVCache, Transformer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "Model",
    "ModelConfig",
    "Transformer",
    "load_pretrained",
]
