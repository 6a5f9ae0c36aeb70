"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) <-> stacks.

`save_peft` writes one adapter of a stack at its own rank (padding stripped) in the layout
`peft.PeftModel.from_pretrained` loads unchanged; `load_peft` reads any number of PEFT LoRA
directories into one stack (zero-padded to the largest rank and the union of targets). The
tensors in the file say which layers and modules carry the adapter; every feature of PEFT's
LoraConfig that changes the computation and that jaxlora does not implement is refused with a
one-line error rather than silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlora.fsutil import staged_dir
from jaxlora.lora import (
    AdapterStack,
    LoRAConfig,
    LoRAError,
    const_values,
    module_dims,
    place_stacked,
    union_placement,
)
from jaxlora.models.convert import hf_name
from jaxlora.models.model import Model, abstract_module
from jaxlora.models.transformer import LINEAR_MODULES

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT LoraConfig fields that change the computation, with the value jaxlora implements.
_UNSUPPORTED = {
    "use_qalora": (False, "QA-LoRA"),
    "lora_bias": (False, "LoRA bias"),
    "fan_in_fan_out": (False, "fan_in_fan_out"),
    "modules_to_save": (None, "modules_to_save"),
    "trainable_token_indices": (None, "trainable tokens"),
    "rank_pattern": ({}, "rank_pattern"),
    "alpha_pattern": ({}, "alpha_pattern"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "target_parameters"),
    "alora_invocation_tokens": (None, "aLoRA"),
    "use_bdlora": (None, "BD-LoRA"),
    "arrow_config": (None, "Arrow routing"),
}
_NAME = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_(?:([AB])\.weight|(magnitude)_vector)$"
)


def _module_path(layer: int, parent: str, module: str) -> tuple:
    return ("layers", layer, parent, module)


def _peft_name(module_path: tuple, factor: str) -> str:
    """PEFT's tensor name of factor `A`, `B` or DoRA's `magnitude` of a projection."""
    base = hf_name((*module_path, "kernel"))[0].removesuffix(".weight")
    if factor == "magnitude":
        return f"{PREFIX}{base}.lora_magnitude_vector"
    return f"{PREFIX}{base}.lora_{factor}.weight"


def save_peft(
    model: Model,
    adapters: AdapterStack,
    index: int,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write adapter `index` of the stack as a PEFT LoRA directory; returns its path.

    A PiSSA or OLoRA adapter is written as PEFT's `save_pretrained(...,
    path_initial_model_for_weight_conversion=...)` converts one: a plain LoRA of rank 2r on
    the unmodified base, A' = [A; A0], B' = [B, -B0] and alpha doubled (x sqrt 2 for rsLoRA), so
    that its scale is unchanged and s B'A' = s (BA - B0A0) is the whole change to the weight."""
    if not 0 <= index < len(adapters):
        raise LoRAError(f"adapter index {index} out of range for a stack of {len(adapters)}")
    cfg = adapters.configs[index]
    weights = dict(nnx.to_flat_state(adapters.weights))
    consts = dict(nnx.to_flat_state(adapters.consts))
    r = cfg.rank
    tensors = {}
    for path, var in weights.items():
        module_path, which = path[:-1], path[-1]
        layer, module = module_path[1], module_path[3]
        if cfg.placement().rank_for(layer, module) == 0:
            continue
        x = np.asarray(var.get_value()[index], np.float32)
        if which == "lora_magnitude":
            if cfg.use_dora:
                tensors[_peft_name(module_path, "magnitude")] = x
            continue
        x = x[:, :r].T if which == "lora_a" else x[:r, :].T  # PEFT's [r, in] and [out, r]
        if cfg.residual:
            x0 = np.asarray(consts[(*module_path, f"{which}0")].get_value()[index], np.float32)
            x = (
                np.concatenate([x, x0[:, :r].T], 0)
                if which == "lora_a"
                else (np.concatenate([x, -x0[:r, :].T], 1))
            )
        tensors[_peft_name(module_path, "A" if which == "lora_a" else "B")] = np.ascontiguousarray(
            x
        )
    widen = 2 if cfg.residual else 1
    alpha = cfg.alpha * (widen**0.5 if cfg.use_rslora else widen)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.config.name_or_path or None,
        "r": widen * r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": list(cfg.targets),
        "layers_to_transform": None if cfg.layers is None else sorted(cfg.layers),
        "layers_pattern": None if cfg.layers is None else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "use_dora": cfg.use_dora,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not path.exists():
        raise LoRAError(f"{adapter_dir}: no {CONFIG_FILE}; is this a PEFT adapter directory?")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{adapter_dir}: peft_type {config['peft_type']!r} is not LoRA")
    for key, (default, feature) in _UNSUPPORTED.items():
        value = config.get(key)
        if value is not None and value != default:
            raise LoRAError(
                f"{adapter_dir}: {feature} ({key}={value!r}) is not supported by "
                "jaxlora; use a plain LoRA adapter"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        raise LoRAError(
            f"{adapter_dir}: init_lora_weights={init!r} adapters train on a modified base; "
            "save them with PEFT's path_initial_model_for_weight_conversion (a plain LoRA on "
            "the original base) and load that"
        )
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{adapter_dir}: bias={config['bias']!r} is not supported; use bias='none'")
    return config


def _read_tensors(adapter_dir: Path, model: Model) -> dict[tuple, dict[str, np.ndarray]]:
    file = adapter_dir / WEIGHTS_FILE
    if not file.exists():
        raise LoRAError(f"{adapter_dir}: no {WEIGHTS_FILE} (only safetensors adapters are read)")
    factors: dict[tuple, dict[str, np.ndarray]] = {}
    with safe_open(file, framework="np") as f:
        for name in f.keys():  # noqa: SIM118
            match = _NAME.match(name.removeprefix(PREFIX))
            if match is None or match[3] not in LINEAR_MODULES:
                raise LoRAError(
                    f"{adapter_dir}: tensor {name} is not a LoRA factor of a "
                    "projection jaxlora supports (q/k/v/o/gate/up/down_proj)"
                )
            layer, parent, module = int(match[1]), match[2], match[3]
            factor = match[4] or "M"
            if layer >= model.config.num_layers:
                raise LoRAError(
                    f"{adapter_dir}: {name} targets layer {layer}, but the base model "
                    f"has {model.config.num_layers} layers"
                )
            factors.setdefault(_module_path(layer, parent, module), {})[factor] = f.get_tensor(
                name
            ).astype(np.float32)
    if not factors:
        raise LoRAError(f"{adapter_dir}: {WEIGHTS_FILE} holds no LoRA weights")
    return factors


def _config_from(adapter_dir: Path, peft: dict, factors: dict, model: Model) -> LoRAConfig:
    layers = sorted({p[1] for p in factors})
    modules = sorted({p[3] for p in factors}, key=LINEAR_MODULES.index)
    if len(factors) != len(layers) * len(modules):
        raise LoRAError(
            f"{adapter_dir}: the adapter targets different modules in different "
            "layers, which jaxlora does not support"
        )
    rank = peft["r"]
    for path, pair in factors.items():
        d_in, d_out = module_dims(model.config, path[3])
        use_dora = bool(peft.get("use_dora", False))
        needed = {"A", "B", "M"} if use_dora else {"A", "B"}
        if set(pair) - needed:
            raise LoRAError(
                f"{adapter_dir}: {path[3]} of layer {path[1]} has a lora_magnitude_vector, but "
                "the adapter's config has no use_dora"
            )
        if needed - set(pair):
            missing = ", ".join(f"lora_{f}" for f in sorted(needed - set(pair)))
            raise LoRAError(
                f"{adapter_dir}: {path[3]} of layer {path[1]} lacks {missing.replace('_M', '_magnitude_vector')}"
            )
        if use_dora and pair["M"].shape != (d_out,):
            raise LoRAError(
                f"{adapter_dir}: {path[3]} of layer {path[1]} has lora_magnitude_vector "
                f"{pair['M'].shape}, but the base model needs ({d_out},)"
            )
        if pair["A"].shape != (rank, d_in) or pair["B"].shape != (d_out, rank):
            raise LoRAError(
                f"{adapter_dir}: {path[3]} of layer {path[1]} has lora_A {pair['A'].shape} and "
                f"lora_B {pair['B'].shape}, but the base model needs ({rank}, {d_in}) and "
                f"({d_out}, {rank}); load it with the base model it was trained on"
            )
    all_layers = len(layers) == model.config.num_layers
    return LoRAConfig(
        rank=rank,
        alpha=float(peft.get("lora_alpha", rank)),
        targets=tuple(modules),
        layers=None if all_layers else tuple(layers),
        dropout=float(peft.get("lora_dropout", 0.0)),
        use_rslora=bool(peft.get("use_rslora", False)),
        use_dora=bool(peft.get("use_dora", False)),
    ).validate(model.config)


def load_peft(
    model: Model, adapter_dirs: Sequence[str | os.PathLike], names: Sequence[str] | None = None
) -> AdapterStack:
    """Read PEFT LoRA directories into one stack (zero-padded to a common rank and placement)."""
    if isinstance(adapter_dirs, (str, os.PathLike)):
        adapter_dirs = [adapter_dirs]
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise LoRAError("load_peft needs at least one adapter directory")
    configs, all_factors = [], []
    for d in dirs:
        if not d.is_dir():
            raise LoRAError(f"{d} is not a directory; pass PEFT adapter directories")
        factors = _read_tensors(d, model)
        configs.append(_config_from(d, _read_config(d), factors, model))
        all_factors.append(factors)
    placement = union_placement(configs)
    _, w_abs, c_abs, _ = abstract_module(model.config, placement, model.dtype, model.param_dtype)
    n = len(dirs)

    def weight(path, var):
        shape = var.get_value().shape
        out = np.zeros((n, *shape), np.float32)
        for a, factors in enumerate(all_factors):
            pair = factors.get(path[:-1])
            if pair is None:
                continue
            r = configs[a].rank
            if path[-1] == "lora_a":
                out[a, :, :r] = pair["A"].T
            elif path[-1] == "lora_b":
                out[a, :r, :] = pair["B"].T
            elif "M" in pair:
                out[a] = pair["M"]
        return place_stacked(var, out, model)

    def const(path, var):
        return place_stacked(var, const_values(configs, path), model)

    names = tuple(names) if names is not None else tuple(d.name for d in dirs)
    return AdapterStack(
        nnx.map_state(weight, w_abs), nnx.map_state(const, c_abs), tuple(configs), names
    )
