"""jaxlora: LoRA adapters as knowledge memory, many adapters trained at once in JAX/Flax."""

from jaxlora.lora import AdapterStack, LoRAConfig, init_adapters
from jaxlora.models import (
    PRESETS,
    CheckpointError,
    ConfigError,
    Model,
    ModelConfig,
    load_pretrained,
)
from jaxlora.peft_io import load_peft, save_peft

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AdapterStack",
    "CheckpointError",
    "ConfigError",
    "LoRAConfig",
    "Model",
    "ModelConfig",
    "init_adapters",
    "load_peft",
    "load_pretrained",
    "save_peft",
]
