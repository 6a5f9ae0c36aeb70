"""One small interface for LLMs outside the model under study (synthesis, judging), with two
implementations: the jaxlora model in process, and any OpenAI-compatible HTTP endpoint.

    backend = make_backend(LLMConfig.from_dict({"backend": "openai", "model": "gpt-4o-mini"}))
    texts = backend.chat([[{"role": "user", "content": "..."}]], GenParams(max_tokens=64))

`complete` and `chat` take a whole batch and return one entry per item, in order: the text, or
an `LLMFailure` for an item that still failed after its retries. They never raise for one item
(a caller such as `jaxlora synth` counts and retries failures itself); they raise `LLMError`
only for a setting that makes every item impossible.

Item i of a call is drawn with seed `params.seed + i`, by both backends: `LocalBackend` gives
row i the key `jax.random.key(seed + i)`, and `OpenAIBackend` sends `seed=seed + i`, which
`jaxlora serve` turns into the same key. Repeating a prompt within a call therefore gives
different samples, a rerun of the same call the same ones, and the local model equals the
local model behind `jaxlora serve`.

- `LocalBackend`: a model path, hub id, preset or run directory, optionally with one adapter (a
  PEFT directory, or the name of a run's adapter). Every prompt of a call is decoded in shared,
  shape-bucketed passes (`engine.py`). JSON mode is *not* constrained decoding here: the local
  model gets the prompt as it is (ask for JSON in the prompt, and parse strictly).
- `OpenAIBackend`: the official `openai` client, `max_concurrency` requests in flight (threads),
  each retried with exponential backoff (`backoff_s * 2**attempt`, or the server's Retry-After
  when it is shorter than 60 s) on 429/5xx and connection errors or timeouts, up to
  `max_retries` retries. Any other 4xx fails at once and is marked `retryable=False` (a prompt
  too long, a bad request: asking again cannot succeed, so callers do not re-ask it either).
  A refused connection (nothing listens at `base_url`) raises `LLMError` at once, and so does
  one network error (not a timeout: a server that is slow is retried) that every first request
  of a call met before anything succeeded: a dead server is one line within seconds, not
  minutes of retries. JSON mode sends
  `response_format={"type": "json_object"}` (chat only: the completions API has no such field).

`preflight(conversations, params)` says, before anything is sent, why a request cannot succeed
when the backend can know it (the local model: prompt plus max_tokens past its positions).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from jaxlora.config import LLMSection, parse_section
from jaxlora.errors import ConfigError, JaxloraError
from jaxlora.llm.engine import Engine, LLMError, Row, resolve_source

__all__ = [
    "Backend",
    "GenParams",
    "LLMConfig",
    "LLMError",
    "LLMFailure",
    "LocalBackend",
    "Message",
    "OpenAIBackend",
    "make_backend",
    "make_llm",
    "read_yaml_section",
]

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


@dataclasses.dataclass(frozen=True)
class GenParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    json_mode: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise LLMError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise LLMError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise LLMError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclasses.dataclass(frozen=True)
class LLMFailure:
    """One request that failed after its retries; `retryable` False when asking again cannot
    succeed (a 4xx other than 429, a prompt the model cannot read)."""

    error: str
    retryable: bool = True


class Backend(Protocol):
    name: str  # identifies the model (synthesis caches results under it)

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[str | LLMFailure]: ...

    def chat(
        self, conversations: Sequence[Sequence[Message]], params: GenParams
    ) -> list[str | LLMFailure]: ...

    def preflight(
        self, conversations: Sequence[Sequence[Message]], params: GenParams
    ) -> str | None: ...


# --------------------------------------------------------------------------- config


class LLMConfig(LLMSection):
    """The `llm:` section (`jaxlora.config.LLMSection`: its keys, defaults and checks), read on
    its own from a mapping, with the API key looked up when a backend is made."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LLMConfig:
        """The section from a YAML mapping, with one-line errors naming the key."""
        try:
            return parse_section("llm", d, cls)
        except ConfigError as e:
            raise LLMError(str(e)) from None

    def api_key(self) -> str:
        env = self.api_key_env or (None if self.base_url else "OPENAI_API_KEY")
        if env is None:
            return "EMPTY"  # local servers (jaxlora serve, vLLM, llama.cpp) take any key
        key = os.environ.get(env)
        if not key:
            raise LLMError(f"llm.api_key_env: the environment variable {env} is not set")
        return key


def make_backend(config: LLMConfig) -> Backend:
    if config.backend == "local":
        return LocalBackend(
            config.model, config.adapter, dtype=config.dtype, max_batch=config.max_batch
        )
    return OpenAIBackend(
        config.model,
        base_url=config.base_url,
        api_key=config.api_key(),
        max_concurrency=config.max_concurrency,
        timeout_s=config.timeout_s,
        max_retries=config.max_retries,
        backoff_s=config.backoff_s,
    )


def make_llm(section: dict | None, overrides: dict[str, Any]) -> Backend:
    """A backend from a config's `llm:` section with command-line values (not None) on top."""
    merged = dict(section or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if not merged.get("backend"):
        raise JaxloraError(
            "no LLM backend: pass --llm-backend local|openai (and --llm-model) or give the "
            "config an llm: section"
        )
    return make_backend(LLMConfig.from_dict(merged))


def read_yaml_section(path: str | Path, name: str) -> dict | None:
    """Section `name` of a YAML file (None when absent); other sections are not looked at, so
    a run config can carry `llm:` and `synth:` beside its own sections."""
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise JaxloraError(f"cannot read {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise JaxloraError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise JaxloraError(f"{p}: expected a mapping of sections")
    section = data.get(name)
    if section is not None and not isinstance(section, dict):
        raise JaxloraError(f"{p}: {name}: expected a mapping of settings")
    return section


# --------------------------------------------------------------------------- local


class LocalBackend:
    """The jaxlora model in process, optionally continued by one adapter."""

    def __init__(
        self,
        model: str | os.PathLike | Any,
        adapter: str | os.PathLike | None = None,
        *,
        dtype: str | None = None,
        max_batch: int = 32,
    ):
        from jaxlora.models import load_pretrained
        from jaxlora.peft_io import load_peft

        if isinstance(model, str | os.PathLike):
            source = resolve_source(model)
            label = str(model)
            model = load_pretrained(source.model, dtype=source.dtype if dtype is None else dtype)
        else:  # an already loaded jaxlora Model
            source, label = None, str(model.config.name_or_path or "model")
        stack = None
        if adapter is not None:
            path = Path(adapter)
            if source is not None and str(adapter) in source.adapters:
                path = source.adapters[str(adapter)]
            elif not path.is_dir():
                known = ", ".join(source.adapters) if source and source.adapters else "none"
                raise LLMError(
                    f"llm.adapter: {adapter} is neither a PEFT directory nor an adapter of the "
                    f"run (its adapters: {known})"
                )
            stack = load_peft(model, [path], [path.name])
            label = f"{label}+{path.name}"
        self.name = f"local:{label}"
        self.engine = Engine(model, stack, max_batch=max_batch)
        self._slot = 0 if stack is None else 1

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[str | LLMFailure]:
        return self._run([self._encode(self.engine.encode, p) for p in prompts], params)

    def chat(
        self, conversations: Sequence[Sequence[Message]], params: GenParams
    ) -> list[str | LLMFailure]:
        return self._run([self._encode(self.engine.encode_chat, c) for c in conversations], params)

    def preflight(
        self, conversations: Sequence[Sequence[Message]], params: GenParams
    ) -> str | None:
        """Why item i cannot be decoded ("item i: ..."), for the first such item, or None."""
        for i, c in enumerate(conversations):
            tokens = self._encode(self.engine.encode_chat, c)
            if isinstance(tokens, LLMFailure):
                return f"item {i}: {tokens.error}"
            row = Row(tokens, self._slot, params.max_tokens, 0.0, 1.0, 0, params.stop)
            if (why := self.engine.problem(row)) is not None:
                return f"item {i}: {why}"
        return None

    @staticmethod
    def _encode(encode, item) -> tuple[int, ...] | LLMFailure:
        try:
            return encode(item)
        except LLMError:  # no chat template: every item would fail the same way
            raise
        except Exception as e:  # one malformed conversation fails alone
            return LLMFailure(f"cannot encode the prompt: {type(e).__name__}: {e}", False)

    def _run(
        self, prompts: list[tuple[int, ...] | LLMFailure], params: GenParams
    ) -> list[str | LLMFailure]:
        results: list[str | LLMFailure] = [LLMFailure("not decoded")] * len(prompts)
        rows, ok = [], []
        for i, p in enumerate(prompts):
            if isinstance(p, LLMFailure):
                results[i] = p
                continue
            row = Row(
                p,
                self._slot,
                params.max_tokens,
                params.temperature,
                params.top_p,
                params.seed + i,
                params.stop,
            )
            why = self.engine.problem(row)
            if why is None:
                rows.append(row)
                ok.append(i)
            else:
                results[i] = LLMFailure(why, retryable=False)
        for i, out in zip(ok, self.engine.run(rows), strict=True):
            results[i] = out.text
        return results


# --------------------------------------------------------------------------- HTTP

_RETRY_STATUS = {429}  # and 5xx: the only statuses that another try may turn around
_MAX_RETRY_AFTER_S = 60.0


class OpenAIBackend:
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, `jaxlora serve`)."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str = "EMPTY",
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
    ):
        import openai

        # The client's own retries are off: ours count attempts per item, back off by our
        # schedule and turn the last failure into an LLMFailure.
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s
        )
        self.name = f"openai:{base_url or 'api.openai.com'}:{model}"
        self.model, self.base_url = model, base_url or "https://api.openai.com/v1"
        self._lock = threading.Lock()
        self._abort = threading.Event()  # set when the call is given up: threads stop at once
        self._any_ok = False  # once a request succeeded, network errors are retried as usual
        self._first_errors: Counter = Counter()
        self.max_concurrency, self.max_retries, self.backoff_s = (
            max_concurrency,
            max_retries,
            backoff_s,
        )

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[str | LLMFailure]:
        def one(i: int, prompt: str) -> str:
            r = self.client.completions.create(
                model=self.model, prompt=prompt, **self._common(params, i)
            )
            return r.choices[0].text or ""

        return self._map(one, prompts)

    def chat(
        self, conversations: Sequence[Sequence[Message]], params: GenParams
    ) -> list[str | LLMFailure]:
        def one(i: int, messages: Sequence[Message]) -> str:
            extra = {"response_format": {"type": "json_object"}} if params.json_mode else {}
            r = self.client.chat.completions.create(
                model=self.model,
                messages=[dict(m) for m in messages],
                **self._common(params, i),
                **extra,
            )
            return r.choices[0].message.content or ""

        return self._map(one, conversations)

    @staticmethod
    def _common(params: GenParams, i: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed + i,
        )
        if params.stop:
            kw["stop"] = list(params.stop)
        return kw

    def preflight(
        self, conversations: Sequence[Sequence[Message]], params: GenParams
    ) -> str | None:
        """None: only the server knows its context; its 4xx answer says so, once per item."""
        return None

    def _map(self, one, items: Sequence[Any]) -> list[str | LLMFailure]:
        if not items:
            return []
        self._abort.clear()
        self._first_errors.clear()
        width = min(self.max_concurrency, len(items))
        with ThreadPoolExecutor(width) as pool:
            futures = [
                pool.submit(self._with_retries, one, i, x, width) for i, x in enumerate(items)
            ]
            try:
                return [f.result() for f in futures]
            except LLMError:
                self._abort.set()  # the others return at their next attempt or backoff
                raise

    def _with_retries(self, one, i: int, item: Any, width: int) -> str | LLMFailure:
        import openai

        for attempt in range(self.max_retries + 1):
            if self._abort.is_set():
                return LLMFailure("the call was given up")
            try:
                out = one(i, item)
                self._any_ok = True
                return out
            except openai.APIStatusError as e:
                error = f"HTTP {e.status_code}: {_message(e)}"
                if e.status_code not in _RETRY_STATUS and e.status_code < 500:
                    return LLMFailure(error, retryable=False)
                delay = _retry_after(e.response) if e.status_code == 429 else None
            except openai.APIConnectionError as e:  # includes timeouts
                error, delay = f"{type(e).__name__}: {e}", None
                if _refused(e):
                    self._abort.set()
                    raise LLMError(
                        f"cannot connect to {self.base_url}: connection refused (is the server "
                        "running, and is --base-url its address?)"
                    ) from None
                # a timeout means a server answered the connection (busy, loading a model):
                # worth its retries; any other network error on every first request is not
                if attempt == 0 and not isinstance(e, openai.APITimeoutError):
                    self._give_up_if_all_fail(error, width)
            except Exception as e:  # a malformed response: never let one item sink the batch
                return LLMFailure(f"{type(e).__name__}: {e}")
            if attempt < self.max_retries:
                self._abort.wait(self.backoff_s * 2**attempt if delay is None else delay)
        return LLMFailure(f"{error} (after {self.max_retries + 1} attempts)")

    def _give_up_if_all_fail(self, error: str, width: int) -> None:
        """Raise when the first `width` requests (all sent at once) met the same network error
        and none has ever succeeded: the endpoint is unreachable, retries only add minutes."""
        with self._lock:
            self._first_errors[error] += 1
            if not self._any_ok and self._first_errors[error] >= width:
                self._abort.set()
                raise LLMError(f"every request to {self.base_url} failed: {error}")


def _refused(e: BaseException) -> bool:
    """Whether a connection error is, at its root, a refused connection."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "connection refused" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))


def _retry_after(response: Any) -> float | None:
    try:
        value = float(response.headers.get("retry-after", ""))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if 0 <= value <= _MAX_RETRY_AFTER_S else None
