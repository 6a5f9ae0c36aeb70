"""Hugging Face checkpoints <-> jaxlora parameters, and the Orbax format of `jaxlora convert`.

Names map one to one (transformers' module names are kept); projection matrices are stored
[in, out] here and [out, in] by transformers. Loading reads each tensor shard by shard
straight from the safetensors files into its target device layout, so the host never holds
more than the slice a device needs, even for sharded checkpoints of large models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlora.errors import JaxloraError
from jaxlora.models.config import ModelConfig

Path_ = tuple[str | int, ...]
ORBAX_MARKER = "jaxlora_checkpoint.json"


class CheckpointError(JaxloraError):
    """A checkpoint that cannot be read as asked; the message names the file and the fix."""


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------------
# names


def hf_name(path: Path_) -> tuple[str, bool]:
    """transformers tensor name of a jaxlora parameter path, and whether it is transposed."""
    parts = [str(p) for p in path]
    if parts == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    if parts[-1] == "kernel":
        return "model." + ".".join(parts[:-1]) + ".weight", True
    return "model." + ".".join(parts), False


# ---------------------------------------------------------------------------------------------
# reading Hugging Face directories


def _safetensors_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, for a single or sharded safetensors checkpoint."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointError(
                f"{model_dir}: shard(s) {', '.join(missing)} listed in "
                "model.safetensors.index.json are missing"
            )
        return files
    single = model_dir / "model.safetensors"
    if not single.exists():
        found = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not found:
            has_bin = any(model_dir.glob("*.bin"))
            hint = (
                (
                    " (only PyTorch .bin files found: re-save the model with "
                    "save_pretrained(safe_serialization=True))"
                )
                if has_bin
                else ""
            )
            raise CheckpointError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}"
            )
        files = {}
        for fname in found:
            with safe_open(model_dir / fname, framework="np") as f:
                files.update({name: model_dir / fname for name in f.keys()})  # noqa: SIM118
        return files
    with safe_open(single, framework="np") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118


def _read_slice(
    file: Path, name: str, transpose: bool, index: tuple[slice, ...], dtype
) -> np.ndarray:
    with safe_open(file, framework="np") as f:
        tensor = f.get_slice(name)
        if transpose:
            return np.asarray(tensor[tuple(reversed(index))]).T.astype(dtype)
        return np.asarray(tensor[index]).astype(dtype)


def load_hf_params(
    model_dir: Path,
    abstract: nnx.State,
    shardings: Callable[[Path_, Any], jax.sharding.Sharding],
) -> nnx.State:
    """Read the base parameters of `abstract` (an eval_shape'd state) from safetensors."""
    files = _safetensors_index(model_dir)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        name, transpose = hf_name(path)
        # A bare decoder saved without its LM head (AutoModel, embedding checkpoints such as
        # Qwen3-Embedding) names its tensors without the "model." prefix.
        if name not in files and name.removeprefix("model.") in files:
            name = name.removeprefix("model.")
        if name not in files:
            raise CheckpointError(
                f"{model_dir}: tensor {name} is missing from the checkpoint "
                "(does config.json match the weights?)"
            )
        with safe_open(files[name], framework="np") as f:
            stored = tuple(f.get_slice(name).get_shape())
        want = var.get_value()
        expected = tuple(reversed(want.shape)) if transpose else tuple(want.shape)
        if stored != expected:
            raise CheckpointError(
                f"{model_dir}: tensor {name} has shape {stored}, config.json implies {expected}"
            )
        np_dtype = np.dtype(want.dtype)
        array = jax.make_array_from_callback(
            want.shape,
            shardings(path, var),
            lambda idx, f=files[name], n=name, t=transpose, d=np_dtype: _read_slice(
                f, n, t, idx, d
            ),
        )
        flat.append((path, var.replace(array)))
    return nnx.from_flat_state(flat)


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    params: nnx.State,
    tokenizer=None,
    max_shard_bytes: int = 2 << 30,
) -> None:
    """Write `params` as a transformers checkpoint (config.json + safetensors [+ tokenizer])."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for path, var in nnx.to_flat_state(params):
        name, transpose = hf_name(path)
        array = np.asarray(jax.device_get(var.get_value()))
        array = np.ascontiguousarray(array.T if transpose else array)
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    hf = config.to_hf()
    hf["torch_dtype"] = str(np.dtype(next(iter(shards[0].values())).dtype))
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(a.nbytes for s in shards for a in s.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# the Orbax layout written by `jaxlora convert`


def is_orbax_dir(path: Path) -> bool:
    return (path / ORBAX_MARKER).exists()


def save_orbax(
    out_dir: Path, source_dir: Path | None, config: ModelConfig, params: nnx.State, tokenizer=None
) -> None:
    """Write params as an Orbax (tensorstore) checkpoint plus config and tokenizer files."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / "params", nnx.to_pure_dict(params))
    if source_dir is not None and (source_dir / "config.json").exists():
        shutil.copy(source_dir / "config.json", out_dir / "config.json")
    else:
        (out_dir / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    dtypes = sorted({str(v.get_value().dtype) for _, v in nnx.to_flat_state(params)})
    (out_dir / ORBAX_MARKER).write_text(json.dumps({"format": "orbax", "dtypes": dtypes}))


def load_orbax_params(
    ckpt_dir: Path, abstract: nnx.State, shardings: Callable[[Path_, Any], jax.sharding.Sharding]
) -> nnx.State:
    """Restore params written by `save_orbax` straight into their target shardings and dtypes."""
    import orbax.checkpoint as ocp

    flat_target = []
    for path, var in nnx.to_flat_state(abstract):
        want = var.get_value()
        flat_target.append(
            (path, jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=shardings(path, var)))
        )
    target = _nest(flat_target)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(Path(ckpt_dir).absolute() / "params", target)
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{ckpt_dir}: Orbax checkpoint does not match config.json ({_first_line(e)})"
        ) from None
    state = jax.tree.map(lambda v: v, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, restored)
    return state


def _nest(flat: list[tuple[Path_, Any]]) -> dict:
    out: dict = {}
    for path, value in flat:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# resolving a model argument


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PROBE_TIMEOUT_S = 3.0


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub client read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or now


def hub_unreachable() -> str | None:
    """Why the hub is not to be asked (offline mode, or no answer to one quick request), or None.

    The hub client retries a failed connection five times with backoff, logging each retry,
    before it falls back to its cache: ~25 s of warnings on an offline machine. One request with
    a short timeout, through the client's own session (its proxies and hooks), decides up front.
    """
    from huggingface_hub import constants, get_session

    if _hub_offline():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # DNS, connection, TLS, timeout; any HTTP status means reachable
        return f"the hub ({constants.ENDPOINT}) is unreachable: {_first_line(e)}"
    return None


def hub_fetch(repo_id: str, fetch: Callable[..., str], hint: str = "") -> Path:
    """`fetch(local_files_only=...)` (a hub client call) for a hub id, asking the hub at most once.

    Offline or with the hub unreachable, only the local hub cache is read (a cached model works
    without a network); any failure is one CheckpointError line that names the fixes, with
    `hint` (a caller's own fix) appended.
    """
    fixes = "pass a local Hugging Face model directory or one written by `jaxlora convert`"
    hint = f"; {hint}" if hint else ""
    if not _HUB_ID.match(repo_id):
        raise CheckpointError(
            f"model {repo_id!r} not found: not a directory, a built-in preset "
            f"(see jaxlora.PRESETS) or a hub id like 'org/name'; {fixes}{hint}"
        )
    unreachable = hub_unreachable()
    try:
        return Path(fetch(local_files_only=unreachable is not None))
    except Exception as e:  # the hub client raises many types; keep the first line
        if unreachable is None:
            raise CheckpointError(
                f"could not download {repo_id!r} from the hub: {_first_line(e)}; {fixes}{hint}"
            ) from None
        raise CheckpointError(
            f"model {repo_id!r} is not in the local hub cache and {unreachable}; {fixes}, or "
            "cache it by running this once where the hub is reachable (HF_HUB_OFFLINE=1 then "
            f"reads the cache without asking the hub){hint}"
        ) from None


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory for a path or a hub id (downloads config, tokenizer and safetensors)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; pass the model directory that holds config.json"
            )
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} is not a model checkpoint: it has no config.json")
        return path
    from huggingface_hub import snapshot_download

    return hub_fetch(
        str(path_or_id),
        lambda **kw: snapshot_download(
            str(path_or_id),
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"],
            **kw,
        ),
    )
