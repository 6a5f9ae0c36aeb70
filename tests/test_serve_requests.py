"""`jaxlora serve`'s strict requests and operations: fields of the wrong JSON type and token ids
outside the vocabulary are 400s, a request whose client has gone never reaches the decoder's
state, a request past its timeout is a 504, every request leaves one access-log line, and the
CLI shows its version and every default."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from concurrent.futures import Future

import jax
import numpy as np
import openai
import pytest

import jaxlora
from jaxlora import lora
from jaxlora.llm.engine import Engine, Row
from jaxlora.llm.serve import Batcher, _Work
from tests.llm_servers import API_KEY, Server, make_adapters


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny model, its two adapters (a stack, as the server loads them) and the server."""
    model = jaxlora.load_pretrained("tiny-llama")
    dirs = make_adapters(model, tmp_path_factory.mktemp("adapters"))
    adapters = [f"{name}={path}" for name, path in dirs.items()]
    server = Server(["tiny-llama", "--adapters", *adapters, "--api-key", API_KEY])
    yield model, jaxlora.load_peft(model, list(dirs.values()), list(dirs)), server
    server.stop()


@pytest.fixture(scope="module")
def server(served):
    return served[2]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


VOCAB = jaxlora.load_pretrained("tiny-llama").config.vocab_size


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": [1, 2, VOCAB]}, "prompt"),
        ({"prompt": [1, -1]}, "prompt"),
        ({"prompt": [[1, 2], [3, 2**40]]}, "prompt"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"seed": "7"}, "seed"),
        ({"echo": 0}, "echo"),
        ({"best_of": True}, "best_of"),
    ],
)
def test_mistyped_fields_and_ids_outside_the_vocabulary_are_400(client, extra, param):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_every_request_leaves_one_access_log_line(server, client):
    """Written once the response is sent: a streamed request's line has its completion
    tokens (the same request not streamed says how many)."""
    ids = [1, 5, 9, 12]
    r = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=3, temperature=0)
    streamed = client.completions.create(
        model="tiny-llama", prompt=ids, max_tokens=3, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=3)
    deadline = time.monotonic() + 10
    want_ok = (
        f'"POST /v1/completions" 200 model=tiny-llama prompt_tokens=4 '
        f"completion_tokens={r.usage.completion_tokens} "
    )
    want_404 = '"POST /v1/completions" 404 model=nope prompt_tokens=- completion_tokens=- '
    while time.monotonic() < deadline:
        lines = list(server.lines)
        if sum(want_ok in x for x in lines) == 2 and any(want_404 in x for x in lines):
            break
        time.sleep(0.1)
    assert sum(want_ok in x for x in lines) == 2, "".join(lines[-5:])  # plain and streamed
    assert sum(want_404 in x for x in lines) == 1, "".join(lines[-5:])
    assert all(x.rstrip().endswith(" ms") for x in lines if '"POST ' in x)


def test_a_request_past_its_timeout_is_504():
    server = Server(["tiny-llama", "--request-timeout", "0.001"])
    try:
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=120)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny-llama", prompt="hi", max_tokens=4)
        assert e.value.status_code == 504
        assert "0.001 s" in e.value.body["message"]
    finally:
        assert server.stop() == 0  # the decoder thread skipped the abandoned request and stopped


def test_a_request_cancelled_mid_decode_leaves_the_decoder_serving():
    """The client of the first request goes away while its pass decodes (its future cancelled
    after the decoder took it); the decoder finishes the pass, answers nobody, and serves the
    next request. Delivering into the cancelled future used to kill the decoder thread, and the
    next request then waited forever."""
    model = jaxlora.load_pretrained("tiny-llama")
    engine = Engine(model, max_batch=4)
    batcher = Batcher(engine, None, wait_s=0.0)
    batcher.start()
    try:
        ids = tuple(engine.encode("The capital of"))
        first = batcher.submit(_Work([Row(ids, max_tokens=32)], Future()))
        deadline = time.monotonic() + 60
        while not batcher.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.001)  # wait until the decoder has taken it
        assert first.cancel()  # the client has gone; the pass is decoding (its compile alone
        # takes seconds)
        second = batcher.submit(_Work([Row(ids, max_tokens=4)], Future()))
        (out,) = second.result(timeout=120)
        assert len(out.tokens) <= 4 and batcher.thread.is_alive()
    finally:
        batcher.stop()


def test_version_and_every_default_in_serves_help():
    run = [sys.executable, "-m", "jaxlora.cli"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"jaxlora {importlib.metadata.version('jaxlora')}"
    text = subprocess.run([*run, "serve", "--help"], capture_output=True, text=True, check=True)
    flat = " ".join(text.stdout.split())
    for default in ("(default: 8000)", "(default: 32)", "(default: 2.0)", "(default: 600.0)"):
        assert default in flat
    assert "(default: None, the run's or the checkpoint's)" in flat  # --dtype


def local_logprobs(served, name: str, ids) -> np.ndarray:
    """log_softmax of the model's own logits [T, V] for `ids` under model `name`."""
    model, stack, _ = served
    row = np.asarray([ids], np.int32)
    if name == "tiny-llama":
        logits = model(row)
    else:
        logits = lora.routed_logits(model, stack, [stack.names.index(name)], row)
    return np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[0], axis=-1))


# float32 logits of size ~1-10 through 2 layers (torch-free: XLA on both sides, but another
# batch and width, so other kernels): log-probabilities agree to ~1e-6; 1e-4 is the issue's.
LOGPROB_BOUND = 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "fact-a", "fact-b"])
def test_echo_scores_the_prompt_with_the_models_own_log_softmax(served, client, name):
    """lm-evaluation-harness's loglikelihood request: echo, max_tokens 0, logprobs N."""
    ids = [1, 17, 23, 5, 99, 42, 7]
    r = client.completions.create(
        model=name, prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    lp = r.choices[0].logprobs
    want = local_logprobs(served, name, ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = np.asarray(lp.token_logprobs[1:])
    expected = want[np.arange(len(ids) - 1), ids[1:]]
    assert np.abs(got - expected).max() < LOGPROB_BOUND
    for t in range(1, len(ids)):
        top = sorted(lp.top_logprobs[t].values(), reverse=True)
        assert len(top) <= 3  # distinct texts: two ids of one text collapse into one key
        assert abs(top[0] - want[t - 1].max()) < LOGPROB_BOUND
    assert r.usage.completion_tokens == 0
    assert r.choices[0].text == served[0].tokenizer.decode(ids, skip_special_tokens=True)


def test_generated_tokens_carry_their_logprobs(served, client):
    """Greedy: every generated token is its position's most likely one, and its logprob is the
    model's over prompt + the tokens before it; chat's logprobs/top_logprobs the same way."""
    ids = [1, 8, 30, 4]
    r = client.completions.create(
        model="fact-a", prompt=ids, max_tokens=5, logprobs=2, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens > 0
    # Greedy decoding, replayed with full forwards: token k is the argmax given the prompt and
    # tokens before it; the server's text piece and logprob for it are that token's.
    seq = list(ids)
    for k, piece in enumerate(lp.tokens):
        want = local_logprobs(served, "fact-a", seq)[-1]
        g = int(want.argmax())
        assert piece == served[0].tokenizer.decode([g])
        assert abs(lp.token_logprobs[k] - want[g]) < LOGPROB_BOUND
        seq.append(g)

    chat = client.chat.completions.create(
        model="fact-b",
        messages=[{"role": "user", "content": "Who?"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens > 0
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < LOGPROB_BOUND  # greedy
        assert bytes(entry.bytes).decode() == entry.token


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),  # scoring only with echo
        ({"logprobs": 1, "stream": True}, "logprobs"),
        ({"echo": True, "stream": True}, "echo"),
    ],
)
def test_bad_logprobs_requests_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            **{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, **extra}
        )
    assert e.value.body["param"] == param


def test_chat_top_logprobs_needs_logprobs(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], top_logprobs=2
        )
    assert e.value.body["param"] == "top_logprobs"


def test_warm_up_compiles_what_the_first_requests_use():
    """With warm-up (the default), the server compiles its decoding programs before it reports
    ready: greedy and sampled requests of short prompts then compile nothing (jax logs every
    compilation with JAX_LOG_COMPILES). One rows bucket (--max-batch 4) keeps it to 4 programs
    (greedy and sampled, streamed and not)."""
    server = Server(["tiny-llama", "--max-batch", "4"], warm_up=True, env={"JAX_LOG_COMPILES": "1"})
    try:
        lines = server.lines
        ready = next(i for i, x in enumerate(lines) if "serving http://" in x)
        warm = [x for x in lines[:ready] if "warm-up: " in x and "programs" in x]
        assert len(warm) == 1 and "4 decoding programs (rows 4; base;" in warm[0], warm
        assert any("Compiling" in x for x in lines[:ready])  # the log can show compilations
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=120)
        for temperature in (0.0, 0.7):
            r = client.completions.create(
                model="tiny-llama", prompt="The capital of", max_tokens=8, temperature=temperature
            )
            assert r.usage.completion_tokens > 0
            chunks = client.completions.create(
                model="tiny-llama",
                prompt="The capital of",
                max_tokens=8,
                temperature=temperature,
                stream=True,
            )
            assert "".join(c.choices[0].text for c in chunks)
        time.sleep(0.5)  # the access-log lines flush before the test reads them
        after = [x for x in server.lines[ready:] if "Compiling" in x]
        assert not after, after[:3]
    finally:
        server.stop()
