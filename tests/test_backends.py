"""The LLM backends: `OpenAIBackend` through the official client against a real `jaxlora serve`
(started on a run directory) equals `LocalBackend` in process, greedy and sampled; retries,
backoff and failures against a small real HTTP server (stdlib, 127.0.0.1); the `llm:` config."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import yaml

import jaxlora
from jaxlora.llm.backends import (
    GenParams,
    LLMConfig,
    LLMError,
    LLMFailure,
    LocalBackend,
    OpenAIBackend,
    make_backend,
)
from tests.llm_servers import Server, make_adapters

PROMPTS = ["The capital of", "Question: What is the phone number of", "The capital of"]
CHATS = [
    [{"role": "user", "content": "Who wrote it?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"}],
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `jaxlora train` leaves it: config.yaml and adapters/<name>/ (PEFT)."""
    run = tmp_path_factory.mktemp("run")
    model = jaxlora.load_pretrained("tiny-llama")
    made = make_adapters(model, tmp_path_factory.mktemp("made"))
    for name, path in made.items():
        shutil.copytree(path, run / "adapters" / name)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "tiny-llama"}}))
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    server = Server([str(run_dir)])
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("adapter", [None, "fact-b"])
def test_openai_backend_against_jaxlora_serve_equals_local_backend(run_dir, server, adapter):
    local = LocalBackend(run_dir, adapter)
    remote = OpenAIBackend(adapter or "tiny-llama", base_url=server.url)
    assert local.name != remote.name
    for params in (
        GenParams(max_tokens=12),
        GenParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=3),
    ):
        here = local.complete(PROMPTS, params)
        assert remote.complete(PROMPTS, params) == here
        assert remote.chat(CHATS, params) == local.chat(CHATS, params)
        assert all(isinstance(t, str) and t for t in here)
        if params.temperature:  # item i draws with seed + i: a repeated prompt is resampled
            assert here[0] != here[2]
        else:
            assert here[0] == here[2]
    # stop strings cut the text the same way on both sides
    full = local.complete(PROMPTS[:1], GenParams(max_tokens=12))[0]
    cut = GenParams(max_tokens=12, stop=(full[4:6],))
    assert remote.complete(PROMPTS[:1], cut) == local.complete(PROMPTS[:1], cut)
    assert len(local.complete(PROMPTS[:1], cut)[0]) < len(full)


def test_one_bad_item_fails_alone(run_dir, server):
    too_long = "word " * 600
    local = LocalBackend(run_dir)
    remote = OpenAIBackend("tiny-llama", base_url=server.url, max_retries=1, backoff_s=0.01)
    for backend in (local, remote):
        out = backend.complete([PROMPTS[0], too_long], GenParams(max_tokens=8))
        assert isinstance(out[0], str)
        assert isinstance(out[1], LLMFailure) and "positions" in out[1].error
    missing = OpenAIBackend("no-such-model", base_url=server.url, backoff_s=10)
    t0 = time.monotonic()
    [failure] = missing.complete(["hi"], GenParams(max_tokens=4))
    assert isinstance(failure, LLMFailure) and "404" in failure.error
    assert time.monotonic() - t0 < 5  # a 404 is not retried


# --------------------------------------------------------------------------- retries


class _Scripted(BaseHTTPRequestHandler):
    """Answers POSTs by the class's script: a list of statuses, the last one repeating."""

    script: ClassVar[list[int]] = [200]
    delay_s = 0.0
    seen: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = len(self.seen)
        self.seen.append(body["model"])
        status = self.script[min(n, len(self.script) - 1)]
        time.sleep(self.delay_s)
        if status == 200:
            payload = {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
            }
        else:
            payload = {"error": {"message": f"scripted {status}", "type": "x", "code": None}}
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    """(set_script(statuses, delay_s), base_url, seen): a real HTTP server on 127.0.0.1."""
    handler = type("Handler", (_Scripted,), {"seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def set_script(statuses, delay_s=0.0):
        handler.script, handler.delay_s = statuses, delay_s

    yield set_script, f"http://127.0.0.1:{httpd.server_address[1]}/v1", handler.seen
    httpd.shutdown()
    httpd.server_close()


def test_429_twice_then_200_succeeds(scripted):
    set_script, url, seen = scripted
    set_script([429, 429, 200])
    backend = OpenAIBackend("m", base_url=url, max_retries=3, backoff_s=0.01)
    assert backend.complete(["hi"], GenParams(max_tokens=4)) == ["ok"]
    assert len(seen) == 3


def test_always_500_fails_after_max_retries(scripted):
    set_script, url, seen = scripted
    set_script([500])
    backend = OpenAIBackend("m", base_url=url, max_retries=2, backoff_s=0.01)
    [failure] = backend.complete(["hi"], GenParams(max_tokens=4))
    assert isinstance(failure, LLMFailure)
    assert "HTTP 500" in failure.error and "3 attempts" in failure.error
    assert len(seen) == 3


def test_timeouts_are_retried_then_fail(scripted):
    set_script, url, seen = scripted
    set_script([200], delay_s=0.5)
    backend = OpenAIBackend("m", base_url=url, max_retries=1, backoff_s=0.01, timeout_s=0.1)
    [failure] = backend.chat([[{"role": "user", "content": "hi"}]], GenParams(max_tokens=4))
    assert isinstance(failure, LLMFailure) and "Timeout" in failure.error
    assert len(seen) == 2


def test_concurrency_is_bounded(scripted):
    set_script, url, _ = scripted
    set_script([200], delay_s=0.2)
    backend = OpenAIBackend("m", base_url=url, max_concurrency=4, backoff_s=0.01)
    t0 = time.monotonic()
    assert backend.complete(["hi"] * 8, GenParams(max_tokens=4)) == ["ok"] * 8
    # 8 requests of 0.2 s, 4 at a time: two rounds, not one and not eight
    assert 0.38 < time.monotonic() - t0 < 1.5


# --------------------------------------------------------------------------- config


def test_llm_config(monkeypatch, run_dir):
    config = LLMConfig.from_dict({"backend": "local", "model": str(run_dir), "adapter": "fact-a"})
    backend = make_backend(config)
    assert isinstance(backend, LocalBackend) and backend.name.endswith("+fact-a")
    with pytest.raises(LLMError, match=r"unknown key llm\.modle \(did you mean llm\.model\?\)"):
        LLMConfig.from_dict({"backend": "local", "modle": "x"})
    with pytest.raises(LLMError, match=r"llm\.model: required"):
        LLMConfig.from_dict({"backend": "openai"})
    with pytest.raises(LLMError, match=r"llm\.backend: expected one of local, openai"):
        LLMConfig.from_dict({"backend": "vllm", "model": "m"})
    with pytest.raises(LLMError, match=r"llm\.max_retries: must be >= 0"):
        LLMConfig.from_dict({"backend": "openai", "model": "m", "max_retries": -1})
    with pytest.raises(LLMError, match=r"llm\.adapter: .* is neither a PEFT directory"):
        make_backend(
            LLMConfig.from_dict({"backend": "local", "model": "tiny-llama", "adapter": "x"})
        )
    openai_cfg = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    monkeypatch.delenv("JAXLORA_TEST_KEY", raising=False)
    with pytest.raises(LLMError, match="JAXLORA_TEST_KEY is not set"):
        make_backend(LLMConfig.from_dict({**openai_cfg, "api_key_env": "JAXLORA_TEST_KEY"}))
    monkeypatch.setenv("JAXLORA_TEST_KEY", "sk-test")
    backend = make_backend(LLMConfig.from_dict({**openai_cfg, "api_key_env": "JAXLORA_TEST_KEY"}))
    assert isinstance(backend, OpenAIBackend) and backend.client.api_key == "sk-test"
    with pytest.raises(LLMError, match="max_tokens"):
        GenParams(max_tokens=0)
