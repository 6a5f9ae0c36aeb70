"""Encoding: records to right-padded token arrays with explicit validity and loss masks.

Formats follow the study (docs/study.md §1, §4), minus its flaws:

| record | chat_template=True                                   | chat_template=False           |
|--------|------------------------------------------------------|-------------------------------|
| row    | row text as the user turn + generation prompt        | text with special tokens + EOS |
| qa     | [user: question, assistant: answer]                  | "Question: q Answer: a" + EOS |
| text   | (no template) text with special tokens + EOS         | same                          |

- One BOS. The chat template is rendered to a string (`tokenize=False`) and that string is
  tokenized with `add_special_tokens=False`: a template that writes its own BOS is not given a
  second one by the tokenizer (the study's double BOS).
- Masks, not sentinel ids. `valid` marks real tokens, `loss` the prediction *targets*. The
  study masked pad tokens by id, which also dropped EOS when pad == eos; here EOS is a target.
  `loss[t]` means "token t is predicted from position t-1", so the first token never is.
- `completion_only` finds the answer by character offsets in the final string
  (`return_offsets_mapping=True`), so it is exact for any tokenizer and template, with no
  re-tokenization of pieces that could merge differently at the boundary. The tokens that
  overlap the answer's characters are targets (so a leading-space token " Paris" counts); for
  an assistant turn, and for a row whose answer ends the user turn, the targets continue
  through the end-of-turn special token: the model learns to stop after the answer.
- Nothing is truncated: a sequence longer than `data.max_length` is an error (the study cut
  long documents to 2048 tokens silently).
- With `vocab_size`, a token outside the model's embedding table is an error: an embedding
  lookup would clamp it to another row silently (a tokenizer may define added tokens the
  checkpoint has no rows for; loading only warns about them, a run that uses one stops here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from jaxlora.data.records import Record
from jaxlora.errors import DataError

LossMask = Literal["full", "completion_only"]
LOSS_MASKS: tuple[str, ...] = ("full", "completion_only")


@dataclass(frozen=True)
class Encoded:
    """N encoded records of width T. Shapes: tokens/valid/loss [N, T]."""

    tokens: np.ndarray  # int32, right-padded with pad_id
    valid: np.ndarray  # bool, real tokens
    loss: np.ndarray  # bool, prediction targets (a subset of valid)
    pad_id: int

    @property
    def lengths(self) -> np.ndarray:
        """[N] int32: real tokens per record."""
        return self.valid.sum(axis=1).astype(np.int32)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def encode(
    records: Sequence[Record],
    tokenizer,
    *,
    chat_template: bool,
    loss_mask: LossMask,
    max_length: int,
    pad_to: int | None = None,
    vocab_size: int | None = None,
) -> Encoded:
    """Encode `records` (see the module docstring for formats and masks); with `vocab_size`,
    every token id must lie inside the model's embedding table."""
    if loss_mask not in LOSS_MASKS:
        raise DataError(f"unknown data.loss_mask {loss_mask!r}: use 'full' or 'completion_only'")
    if max_length <= 0:
        raise DataError(f"data.max_length must be positive, got {max_length}")
    if not records:
        raise DataError("no records to encode: check data.path and the data budget")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token: set one in the tokenizer config")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: set data.chat_template: false")

    enc = _Encoder(tokenizer, chat_template, loss_mask == "completion_only", eos)
    seqs = [enc(i, r) for i, r in enumerate(records)]
    for i, (ids, _) in enumerate(seqs):
        if vocab_size is not None:
            check_vocab(ids, tokenizer, vocab_size, f"record {i}")
        if len(ids) > max_length:
            raise DataError(
                f"record {i} has {len(ids)} tokens, more than data.max_length={max_length}: "
                "raise data.max_length or split the text into shorter chunks"
            )
    longest = max(len(ids) for ids, _ in seqs)
    if pad_to is not None:
        if pad_to < longest:
            raise DataError(
                f"pad_to={pad_to} is shorter than the longest sequence ({longest} tokens)"
            )
        width = pad_to
    else:
        width = min(-(-longest // 8) * 8, max_length)

    n = len(seqs)
    tokens = np.full((n, width), pad, np.int32)
    valid = np.zeros((n, width), bool)
    loss = np.zeros((n, width), bool)
    for i, (ids, targets) in enumerate(seqs):
        tokens[i, : len(ids)] = ids
        valid[i, : len(ids)] = True
        loss[i, : len(ids)] = True if targets is None else targets
    loss[:, 0] = False  # nothing predicts the first token
    return Encoded(tokens=tokens, valid=valid, loss=loss, pad_id=int(pad))


def check_vocab(ids: Sequence[int], tokenizer, vocab_size: int, where: str) -> None:
    """A DataError naming the first of `ids` outside a `vocab_size`-row embedding table."""
    bad = next((int(t) for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise DataError(
            f"{where} has the token {tokenizer.convert_ids_to_tokens(bad)!r} (id {bad}), outside "
            f"the model's {vocab_size}-row embedding table: use the tokenizer that belongs to "
            "the checkpoint, or remove that token from the data or the chat template"
        )


class _Encoder:
    """Per-record encoding: token ids and, in completion_only mode, the target flags."""

    def __init__(self, tokenizer, chat_template: bool, completion: bool, eos: int):
        self.tok, self.chat, self.completion, self.eos = tokenizer, chat_template, completion, eos
        self.turn_end = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.turn_end |= set(tokenizer.all_special_ids)

    def __call__(self, i: int, r: Record) -> tuple[list[int], list[bool] | None]:
        if r.kind == "text":
            if self.completion:
                raise DataError(
                    f"record {i} is a text document with no answer to complete: "
                    "use data.loss_mask: full"
                )
            ids, _ = self._tokenize(r.text, special=True)
            return self._with_eos(ids), None
        if r.kind == "row":
            return self._row(i, r)
        return self._qa(i, r)

    def _row(self, i: int, r: Record) -> tuple[list[int], list[bool] | None]:
        if self.chat:
            s = self._render(i, [{"role": "user", "content": r.text}], prompt=True)
            ids, offsets = self._tokenize(s, special=False)
            if not self.completion:
                return ids, None
            answer = self._answer(i, r)
            base = s.rfind(r.text.strip())
            start = r.text.strip().rfind(answer)
            if base < 0 or start < 0:
                raise DataError(
                    f"record {i}: the answer cannot be located in the chat-templated row: "
                    "use data.loss_mask: full"
                )
            targets = _overlap(offsets, base + start, base + start + len(answer))
            return ids, self._through_turn_end(ids, targets)
        return self._plain(i, r.text, r)

    def _qa(self, i: int, r: Record) -> tuple[list[int], list[bool] | None]:
        if r.question is None or r.answer is None:
            raise DataError(f"qa record {i} lacks a question or an answer: fill in both fields")
        if not self.chat:
            return self._plain(i, f"Question: {r.question} Answer: {r.answer}", r)
        user = [{"role": "user", "content": r.question}]
        prompt = self._render(i, user, prompt=True)
        full = self._render(i, [*user, {"role": "assistant", "content": r.answer}], prompt=False)
        ids, offsets = self._tokenize(full, special=False)
        if not self.completion:
            return ids, None
        answer = self._answer(i, r)
        a0 = full.find(answer, len(prompt)) if full.startswith(prompt) else full.rfind(answer)
        if a0 < 0:
            raise DataError(
                f"record {i}: the answer cannot be located in the chat-templated dialogue: "
                "use data.loss_mask: full"
            )
        return ids, self._through_turn_end(ids, _overlap(offsets, a0, a0 + len(answer)))

    def _through_turn_end(self, ids: list[int], targets: list[bool]) -> list[bool]:
        """The answer's targets continued through the end of its turn (the special token that
        closes it): the model must learn to stop after the answer, in the assistant's turn as
        in a PhoneBook row's user turn, whose answer ends it."""
        j = max(k for k, t in enumerate(targets) if t) + 1
        while j < len(ids):
            targets[j] = True
            if ids[j] in self.turn_end:
                break
            j += 1
        return targets

    def _plain(self, i: int, s: str, r: Record) -> tuple[list[int], list[bool] | None]:
        """Untemplated text + EOS; in completion mode the answer at the end of `s`, and EOS."""
        ids, offsets = self._tokenize(s, special=True)
        ids = self._with_eos(ids)
        if not self.completion:
            return ids, None
        answer = self._answer(i, r)
        a0 = s.rstrip().rfind(answer)
        if a0 < 0:
            raise DataError(f"record {i}: the answer is not part of the row text {s[:80]!r}")
        targets = _overlap(offsets, a0, a0 + len(answer))
        targets += [True] * (len(ids) - len(targets))
        return ids, targets

    def _answer(self, i: int, r: Record) -> str:
        if not r.answer or not r.answer.strip():
            raise DataError(
                f"record {i} has no known answer, so completion_only has nothing to mark: "
                "use data.loss_mask: full (or a file with question/answer fields)"
            )
        return r.answer.strip()

    def _render(self, i: int, messages: list[dict[str, str]], *, prompt: bool) -> str:
        try:
            out = self.tok.apply_chat_template(
                messages, add_generation_prompt=prompt, tokenize=False
            )
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(
                f"record {i}: the chat template failed ({reason}): set data.chat_template: false"
            ) from e
        return out if isinstance(out, str) else out[0]

    def _tokenize(self, s: str, *, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(s, add_special_tokens=special, return_offsets_mapping=self.completion)
        ids = list(enc["input_ids"])
        return ids, (list(enc["offset_mapping"]) if self.completion else [])

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos else [*ids, self.eos]


def _overlap(offsets: list[tuple[int, int]], a0: int, a1: int) -> list[bool]:
    """Tokens whose character span intersects [a0, a1)."""
    return [s < a1 and e > a0 and e > s for s, e in offsets]
