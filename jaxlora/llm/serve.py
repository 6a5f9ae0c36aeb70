"""`jaxlora serve`: an OpenAI-compatible HTTP endpoint over a model and its adapter library.

    jaxlora serve runs/quickstart                        # the run's base model + its adapters
    jaxlora serve tiny-llama --adapters a=path/to/peft --port 8000 --api-key secret

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the tokenizer's
chat template), both with `stream: true` (server-sent events in OpenAI's chunk format, ending
with `data: [DONE]`). A request's `model` is the base model's name, an adapter's name, or
`memory` when the server was given a memory hook (below).

Design:

- **One decoder thread, shared passes.** Handlers validate and hand `Row`s to a `Batcher`; its
  thread takes everything queued, waits `batch_wait_ms` for more, and decodes the lot with one
  `Engine.run` (base-only batches through the base program, mixed batches routed over one
  stack [zero adapter, *adapters], see `engine.py`). It is the only thread that runs JAX work;
  concurrent requests for different adapters share a pass.
- **Tokenizing off the event loop**: prompts are tokenized and checked, and log-probabilities
  turned into text, on one tokenizer thread (`Service.tokenizer`), never on the event loop
  (a `memory` row, whose prompt needs its route's context, on the decoder thread).
- **Streaming is incremental**: a streamed request's rows decode with the compiled loop handing
  its tokens to the host every few steps (`Engine.run(on_text=...)`: an ordered io_callback, an
  incremental detokeniser, `stream.py`), so chunks leave as tokens are drawn; each request's
  pieces reach its response through an asyncio queue fed from the decoder's side
  (`call_soon_threadsafe`), what queued up meanwhile leaving as one chunk. The chunks
  concatenate to exactly the non-streamed text (stop strings and `max_tokens` included). An
  error after the response has started is an `error` event; a client that disconnects
  mid-stream is dropped, and the server serves on.
- **Errors are OpenAI's JSON** `{"error": {"message", "type", "param", "code"}}`: 401 for a
  wrong key, 404 for an unknown model or route, 400 for bad parameters (`requests.py`: every
  field strictly typed, token ids in the vocabulary, checked before any decoding, including
  "prompt + max_tokens exceeds the model's positions"), 500 when decoding raised, 504 past the
  request timeout; the server keeps serving after any of them. A request whose client has gone
  (cancelled, timed out) is skipped by the decoder, never answered into.
- **Log-probabilities** (`logprobs`, `echo`, chat `top_logprobs`): the decoder thread scores
  each such row after its pass with one forward over prompt + completion (`Engine.score`).
- **Access log** (`access.py`): one line per request on stderr once its response has been
  sent (client, method, path, status, model, prompt and completion tokens, milliseconds; a
  stream's completion tokens and whole time included).
- **Shutdown**: SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight requests finish
  (the decoder thread stops only after uvicorn has drained them) and exits 0.
- **Memory hook.** `serve(..., memory=fn)` enables model `memory`: `fn(questions)` gets the
  questions of every `memory` request of a pass (a completion's prompt, a chat's last user
  message) and returns one `MemoryRoute` each: a one-adapter stack (e.g. the router's top-k
  merged by the combiner) and an optional context (ICL / RAG text) put before the question.
  The rows then decode routed over those stacks, in the same pass machinery.

Sampling follows the request: `temperature` 0 is greedy; a request's `seed` (default: random)
is its row's key, so the same request gives the same text alone or batched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jaxlora.llm.access import add_access_log
from jaxlora.llm.engine import (
    Engine,
    LLMError,
    Output,
    Row,
    Scores,
    concat_stacks,
    resolve_source,
)
from jaxlora.llm.requests import APIError, flag, prompts, sampling
from jaxlora.llm.requests import messages as parse_messages
from jaxlora.llm.stream import feeder, sse_events
from jaxlora.lora import AdapterStack

log = logging.getLogger(__name__)
MEMORY = "memory"


@dataclasses.dataclass(frozen=True)
class MemoryRoute:
    """What the memory gives one question: a stack of ONE adapter, and context text."""

    adapter: AdapterStack
    context: str = ""


Memory = Callable[[Sequence[str]], Sequence[MemoryRoute]]


# --------------------------------------------------------------------------- batching


@dataclasses.dataclass
class _Work:
    rows: list[Row]
    future: Future
    # memory requests: the questions, and how a route turns question i into its row
    questions: list[str] | None = None
    build: Callable[[int, MemoryRoute], Row] | None = None
    emit: Callable[[int, str], None] | None = None  # streamed: (its row j, piece of its text)


def _router(batch: list[_Work]) -> Callable[[int, str], None] | None:
    """`Engine.run`'s on_text for a batch: its row i is row j of one streamed request."""
    if all(w.emit is None for w in batch):
        return None
    rows = [(w.emit, j) for w in batch for j in range(len(w.rows))]
    return lambda i, piece: rows[i][0] and rows[i][0](rows[i][1], piece)


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a request's future unless its client has gone (a cancelled future): a request that
    was cancelled or timed out never touches the decoder thread again."""
    if not future.done() and future.set_running_or_notify_cancel():
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _deliver(batch: list[_Work], outputs: list) -> None:
    """Each request's share of a pass's outputs (its rows, in order)."""
    start = 0
    for w in batch:
        _settle(w.future, outputs[start : start + len(w.rows)])
        start += len(w.rows)


class Batcher:
    """The decoder thread: collects queued work for `wait_s`, decodes it in shared passes."""

    def __init__(self, engine: Engine, memory: Memory | None, wait_s: float):
        self.engine, self.memory, self.wait_s = engine, memory, wait_s
        self.queue: queue.Queue[_Work | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="jaxlora-decoder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def submit(self, work: _Work) -> Future:
        self.queue.put(work)
        return work.future

    def _loop(self) -> None:
        while (first := self.queue.get()) is not None:
            batch, stop = [first], False
            deadline = time.monotonic() + self.wait_s
            while sum(len(w.rows) for w in batch) < self.engine.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            live = [w for w in batch if not w.future.cancelled()]  # their clients have gone
            try:
                self._decode([w for w in live if w.questions is None])
                self._decode_memory([w for w in live if w.questions is not None])
            except Exception as e:  # nothing ends the thread: the pass's requests get a 500
                log.exception("the decoder failed")
                for w in live:
                    _settle(w.future, error=e)
            if stop:
                return

    def _decode(self, batch: list[_Work]) -> None:
        if not batch:
            return
        try:
            rows = [r for w in batch for r in w.rows]
            outputs = self.engine.score(rows, self.engine.run(rows, on_text=_router(batch)))
        except Exception as e:  # answered as 500 for these requests; the thread lives on
            log.exception("decoding failed")
            for w in batch:
                _settle(w.future, error=e)
            return
        _deliver(batch, outputs)

    def _decode_memory(self, batch: list[_Work]) -> None:
        if not batch:
            return
        try:
            questions = [q for w in batch for q in w.questions or ()]
            routes = list(self.memory(questions))  # type: ignore[misc]
            if len(routes) != len(questions) or any(len(r.adapter) != 1 for r in routes):
                raise LLMError("the memory hook must return one single-adapter route per question")
            stack = concat_stacks(self.engine.model, [r.adapter for r in routes])
            rows, k = [], 0
            for w in batch:
                w.rows = [
                    dataclasses.replace(w.build(i, routes[k + i]), adapter=k + i)
                    for i in range(len(w.questions or ()))
                ]
                rows.extend(w.rows)
                k += len(w.rows)
            run = self.engine.run(rows, adapters=stack, on_text=_router(batch))
            outputs = self.engine.score(rows, run, stack)
        except Exception as e:
            log.exception("memory decoding failed")
            for w in batch:
                _settle(w.future, error=e)
            return
        _deliver(batch, outputs)


# --------------------------------------------------------------------------- the app


class Service:
    """The engine, its model names and the batcher: what the routes serve."""

    def __init__(
        self,
        engine: Engine,
        base_name: str,
        memory: Memory | None,
        wait_s: float,
        timeout_s: float = 600.0,
    ):
        self.engine, self.base_name, self.timeout_s = engine, base_name, timeout_s
        names = engine.stack.names[1:] if engine.stack is not None else ()
        self.slots = {base_name: 0, **{n: i + 1 for i, n in enumerate(names)}}
        self.memory = memory
        self.batcher = Batcher(engine, memory, wait_s)
        # The tokenizer's one thread (HF tokenizers are not for concurrent use from many).
        self.tokenizer = ThreadPoolExecutor(1, thread_name_prefix="jaxlora-tokenizer")
        self.created = int(time.time())

    @property
    def model_names(self) -> list[str]:
        return [*self.slots, *([MEMORY] if self.memory is not None else [])]

    def slot(self, body: dict) -> int | None:
        """The adapter slot of the request's model (None: the memory)."""
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError(400, "model is required", "model")
        if name == MEMORY and self.memory is not None:
            return None
        if name not in self.slots:
            raise APIError(
                404,
                f"The model '{name}' does not exist; served: {', '.join(self.model_names)}",
                "model",
                "model_not_found",
            )
        return self.slots[name]

    async def off_loop(self, fn: Callable, *args):
        """`fn(*args)` on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer, fn, *args)

    async def start(
        self, body: dict, chat: bool, emit: Callable[[int, str], None] | None = None
    ) -> tuple[_Work, list[str] | None]:
        """Validate and tokenize (on the tokenizer thread), then queue for the decoder: the
        request's work and, with `echo`, its prompts' texts. `emit`: stream its rows' text."""
        work, echoes = await self.off_loop(self._prepare, body, chat, emit)
        self.batcher.submit(work)
        return work, echoes

    async def generate(self, body: dict, chat: bool) -> tuple[list[Output], int]:
        """Validate, tokenize, decode (in the batcher): outputs and prompt token count."""
        work, echoes = await self.start(body, chat)
        try:
            outputs = await asyncio.wait_for(asyncio.wrap_future(work.future), self.timeout_s)
        except TimeoutError:  # the wait cancelled the future: the decoder will skip it
            raise APIError(
                504, f"decoding did not finish within the server's {self.timeout_s:g} s"
            ) from None
        except Exception as e:
            raise APIError(500, f"decoding failed: {type(e).__name__}: {e}") from e
        if echoes is not None:  # the prompts' text leads each choice's text
            outputs = [
                dataclasses.replace(o, text=t + o.text)
                for t, o in zip(echoes, outputs, strict=True)
            ]
        return outputs, sum(len(r.tokens) for r in work.rows)

    def _prepare(self, body: dict, chat: bool, emit) -> tuple[_Work, list[str] | None]:
        slot = self.slot(body)
        settings = {**sampling(body, 256 if chat else 16, chat), "stream": emit is not None}
        if chat:
            messages = parse_messages(body)
            texts: list = [messages]
            encode = self.engine.encode_chat
        else:
            texts = prompts(body, self.engine.model.config.vocab_size)
            encode = self.engine.encode

        def tokens(item) -> tuple[int, ...]:
            return item if isinstance(item, tuple) else encode(item)

        work = _Work([Row(tokens(t), slot or 0, **settings) for t in texts], Future(), emit=emit)
        for row in work.rows:
            if (why := self.engine.problem(row)) is not None:
                raise APIError(400, why, "prompt" if not chat else "messages")
        if slot is None:  # the memory: rows are built once the hook has routed the questions
            questions = [_question(t) for t in texts]

            def build(i: int, route: MemoryRoute) -> Row:
                return Row(tokens(_with_context(texts[i], route.context)), **settings)

            work = _Work(work.rows, Future(), questions, build, emit)
        echoes = None
        if settings["echo"]:
            echoes = [t if isinstance(t, str) else self.engine.decode_text(t) for t in texts]
        return work, echoes


def _question(item) -> str:
    if isinstance(item, list):  # a chat: its last user message
        return next((m["content"] for m in reversed(item) if m["role"] == "user"), "")
    return item if isinstance(item, str) else ""


def _with_context(item, context: str):
    if not context:
        return item
    if isinstance(item, list):
        last = (
            max(i for i, m in enumerate(item) if m["role"] == "user")
            if any(m["role"] == "user" for m in item)
            else len(item) - 1
        )
        return [
            m if i != last else {**m, "content": context + m["content"]} for i, m in enumerate(item)
        ]
    return context + item if isinstance(item, str) else item


def build_app(service: Service, api_key: str | None = None):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.stop()  # after uvicorn drained the in-flight requests
        service.tokenizer.shutdown()

    app = FastAPI(title="jaxlora serve", lifespan=lifespan)

    add_access_log(app)

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error(APIError(400, f"invalid request: {e}"))

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        log.exception("request failed")
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", None, "invalid_api_key")

    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        data = [
            {"id": n, "object": "model", "created": service.created, "owned_by": "jaxlora"}
            for n in service.model_names
        ]
        return {"object": "list", "data": data}

    async def respond(request: Request, chat: bool):
        check_key(request)
        body = await json_body(request)
        stream = flag(body, "stream")
        if isinstance(body.get("model"), str):
            request.state.model = body["model"]
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        common = {"id": rid, "created": int(time.time()), "model": body["model"]}
        if stream:
            pieces: asyncio.Queue = asyncio.Queue()
            work, _ = await service.start(body, chat, feeder(pieces))
            prompt_tokens = sum(len(r.tokens) for r in work.rows)
            request.state.tokens = (prompt_tokens, "-")

            def count(future: Future) -> None:  # on the decoder thread, before the last event
                if not future.cancelled() and future.exception() is None:
                    completion = sum(len(o.tokens) for o in future.result())
                    request.state.tokens = (prompt_tokens, completion)

            work.future.add_done_callback(count)
            events = sse_events(
                work.future, len(work.rows), pieces, common, chat, service.timeout_s
            )
            return StreamingResponse(events, media_type="text/event-stream")
        outputs, prompt_tokens = await service.generate(body, chat)
        request.state.tokens = (prompt_tokens, sum(len(o.tokens) for o in outputs))
        completion = sum(len(o.tokens) for o in outputs)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if any(o.scores for o in outputs):  # token texts: the tokenizer's thread
            return await service.off_loop(_body, service.engine, outputs, common, usage, chat)
        return _body(service.engine, outputs, common, usage, chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    return app


def _body(engine: Engine, outputs: list[Output], common: dict, usage: dict, chat: bool) -> dict:
    """A non-streamed response."""
    choices = []
    for i, o in enumerate(outputs):
        if chat:
            text: dict = {"message": {"role": "assistant", "content": o.text}}
            scored = o.scores and _chat_logprobs(engine, o.scores)
        else:
            text = {"text": o.text}
            scored = o.scores and _completion_logprobs(engine, o.scores)
        choices.append({"index": i, **text, "logprobs": scored, "finish_reason": o.finish_reason})
    kind = "chat.completion" if chat else "text_completion"
    return {**common, "object": kind, "choices": choices, "usage": usage}


def _piece(engine: Engine, token: int) -> str:
    return engine.tok.decode([token], skip_special_tokens=False)


def _completion_logprobs(engine: Engine, scores: Scores) -> dict:
    """OpenAI's completions `logprobs`: each token's text and log-probability (None for a
    first token), its top alternatives by text, and its offset in the choice's text."""
    pieces = [_piece(engine, t) for t in scores.tokens]
    offsets, at = [], 0
    for t in scores.tokens:
        offsets.append(at)
        at += len(engine.decode_text([t]))
    return {
        "tokens": pieces,
        "token_logprobs": list(scores.logprobs),
        "top_logprobs": [None if top is None else _by_text(engine, top) for top in scores.top],
        "text_offset": offsets,
    }


def _by_text(engine: Engine, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """Top alternatives keyed by their text, most likely first; of ids that decode to the same
    text (byte pieces, special tokens) the most likely one keeps the key."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(_piece(engine, t), lp)
    return out


def _chat_logprobs(engine: Engine, scores: Scores) -> dict:
    """OpenAI's chat `logprobs`: per generated token its text, bytes, log-probability and top
    alternatives."""

    def entry(token: int, logprob: float) -> dict:
        piece = _piece(engine, token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top or ()]}
            for t, lp, top in zip(scores.tokens, scores.logprobs, scores.top, strict=True)
        ]
    }


# --------------------------------------------------------------------------- entry point


def load_service(
    model_or_run_dir: str | Path,
    adapters: dict[str, str | Path] | None = None,
    *,
    dtype: str | None = None,
    max_batch: int = 32,
    batch_wait_ms: float = 2.0,
    memory: Memory | None = None,
    model=None,
    timeout_s: float = 600.0,
) -> Service:
    """Load the model and its adapters (the run's, then `adapters`) into a Service; `model`,
    when given, is the already loaded base (the memory's job shares it)."""
    from jaxlora.models import load_pretrained
    from jaxlora.peft_io import load_peft

    source = resolve_source(model_or_run_dir)
    library = dict(source.adapters)
    base_name = Path(source.model).name if Path(source.model).exists() else source.model
    for name, path in (adapters or {}).items():
        if name in library or name in (base_name, MEMORY):
            raise LLMError(f"--adapters {name}=...: the name {name!r} is already taken")
        if not Path(path).is_dir():
            raise LLMError(f"--adapters {name}={path}: not a directory (expected a PEFT adapter)")
        library[name] = Path(path)
    if model is None:
        model = load_pretrained(source.model, dtype=dtype or source.dtype)
    stack = load_peft(model, list(library.values()), list(library)) if library else None
    engine = Engine(model, stack, max_batch=max_batch)
    return Service(engine, base_name, memory, batch_wait_ms / 1e3, timeout_s)


def serve(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    warm_up: bool = True,
) -> int:
    """Run the server until SIGTERM or Ctrl-C; returns 0 once in-flight requests are answered.
    `warm_up`: compile the common decoding programs before reporting ready (`Engine.warm_up`),
    so a first burst of requests does not wait for compilation."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise LLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(1024)
    if warm_up:  # on this thread, before the decoder thread owns the engine
        print("jaxlora: warm-up: compiling ...", file=sys.stderr, flush=True)
        print(f"jaxlora: warm-up: {service.engine.warm_up()}", file=sys.stderr, flush=True)
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    print(
        f"jaxlora: serving {url} (models: {', '.join(service.model_names)})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(build_app(service, api_key), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained; under the default
    # handler SIGTERM would then kill us with status -15 instead of exiting 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0
