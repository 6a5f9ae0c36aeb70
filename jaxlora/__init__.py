"""jaxlora: LoRA adapters as knowledge memory, many adapters trained at once in JAX/Flax."""

from jaxlora.models import (
    PRESETS,
    CheckpointError,
    ConfigError,
    Model,
    ModelConfig,
    load_pretrained,
)

__version__ = "0.1.0"

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "Model", "ModelConfig", "load_pretrained"]
