"""Hub access offline or with the hub unreachable: at most one request, then the local cache,
then one error line that names the fixes. Nothing here reaches the network: the unreachable hub
is a closed port on 127.0.0.1, the reachable one a stub server there."""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

import jaxlora
from jaxlora.models.convert import CheckpointError, resolve_model_dir
from jaxlora.models.model import model_config
from jaxlora.models.presets import shape_preset_for

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
# The hub client's own retries of one failed connection sleep 1+2+4+8+8 s.
QUICK_S = 5.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of this test's own."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def set_endpoint(monkeypatch, endpoint: str) -> None:
    """Point the hub client at `endpoint`, with offline mode off."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def cache_model(cache: Path, repo_id: str) -> Path:
    """A model in the hub cache's layout, as a download leaves it (config.json only)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    config = jaxlora.PRESETS["tiny-llama"].config.to_hf()
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot


def check_one_line(message: str, *needles: str) -> None:
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "model_id, preset",
    [
        (LLAMA, "llama-3.1-8b-shape"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-shape"),
        ("meta-llama/Llama-3.2-1B", "llama-3.2-1b-shape"),
        ("Qwen/Qwen3-8B-Base", "qwen3-8b-shape"),
        ("Qwen/Qwen3-0.6B", "qwen3-0.6b-shape"),
        ("meta-llama/Llama-3.1-80B", None),
        ("Qwen/Qwen2.5-7B", None),
    ],
)
def test_shape_preset_for(model_id, preset):
    assert shape_preset_for(model_id) == preset


def test_offline_flag_reads_cache_only_and_names_fixes(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        model_config(LLAMA)
    assert time.monotonic() - start < QUICK_S
    check_one_line(
        str(e.value),
        "HF_HUB_OFFLINE is set",
        "--set model.path=llama-3.1-8b-shape",
        "jaxlora convert",
        "local Hugging Face model directory",
    )
    with pytest.raises(CheckpointError) as e:
        resolve_model_dir("org/none")
    check_one_line(str(e.value), "'org/none'", "jaxlora convert", "HF_HUB_OFFLINE=1")
    assert "-shape" not in str(e.value)  # a preset is no fix for loading weights

    with pytest.raises(CheckpointError) as e:
        model_config("Qwen/Qwen2.5-7B")  # no preset of its architecture: list them
    check_one_line(str(e.value), "llama-3.1-8b-shape", "qwen3-8b-shape")


def test_unreachable_hub_is_asked_once(hub_cache, monkeypatch, caplog):
    set_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    caplog.set_level(logging.DEBUG)
    for call, needles in [
        (lambda: model_config(LLAMA), ["llama-3.1-8b-shape"]),
        (lambda: resolve_model_dir("org/none"), ["'org/none'"]),
    ]:
        start = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            call()
        assert time.monotonic() - start < QUICK_S
        check_one_line(str(e.value), "is unreachable", "jaxlora convert", *needles)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


@pytest.mark.parametrize("reach", ["offline", "unreachable"])
def test_cached_model_works_without_hub(hub_cache, monkeypatch, reach):
    snapshot = cache_model(hub_cache, "org/tiny")
    if reach == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        set_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    assert model_config("org/tiny").hidden_size == jaxlora.PRESETS["tiny-llama"].config.hidden_size
    assert resolve_model_dir("org/tiny") == snapshot
    assert time.monotonic() - start < QUICK_S


def test_reachable_hub_is_asked_normally(hub_cache, monkeypatch):
    """With the probe answered, the hub client runs as usual (here: a 404 for the model)."""
    seen: list[tuple[str, str]] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def answer(self):
            seen.append((self.command, self.path))
            self.send_response(200 if self.path == "/" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        set_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(CheckpointError) as e:
            model_config("org/none")
    finally:
        server.shutdown()
        server.server_close()
    check_one_line(str(e.value), "could not download 'org/none' from the hub", "jaxlora convert")
    assert seen[0] == ("HEAD", "/")  # the probe, then the client's own request, once
    assert [p for _, p in seen if p.startswith("/org/")] == ["/org/none/resolve/main/config.json"]


@pytest.mark.parametrize("reach", ["offline", "unreachable"])
def test_plan_without_hub_fails_at_once_with_one_line(tmp_path, reach):
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env["HF_HUB_CACHE"] = str(tmp_path / "hub-cache")
    if reach == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    config = "configs/phonebook_capacity_llama3_8b.yaml"
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "jaxlora.cli", "plan", config, "--devices", "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("jaxlora: error:")
    assert "--set model.path=llama-3.1-8b-shape" in lines[0]
    assert elapsed < 10.0  # python, jax and the CLI start in ~3 s; the hub's retries took 25
