"""Data-size budgets: how much knowledge one adapter is asked to store.

The study measures data size in tokens of the raw knowledge (K = thousands of Llama-3 tokens;
1K ≈ 48 PhoneBook rows), not in rows and not in templated training tokens, and each size is
the longest prefix of the dataset that fits. Keeping prefixes makes the sizes nested, so a
capacity curve compares adapters whose knowledge sets contain one another.

Counting uses `add_special_tokens=False`: BOS/EOS and chat-template tokens are framing, not
knowledge, and must not make the same facts cost a different budget under another template.
Asking for more than the data holds is an error, never a silent clamp: a grid cell labelled
20K must contain 20K tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlora.data.records import Record
from jaxlora.errors import DataError


def count_tokens(records: Sequence[Record], tokenizer) -> np.ndarray:
    """[N] int64: tokens of each record's knowledge text, without special tokens."""
    if not records:
        return np.zeros((0,), np.int64)
    texts = [r.knowledge_text for r in records]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.asarray([len(x) for x in ids], np.int64)


def check_budget_args(size_tokens: int | None, size_rows: int | None) -> None:
    """Reject contradictory or non-positive budgets with the config key to fix."""
    if size_tokens is not None and size_rows is not None:
        raise DataError(
            f"data.size_tokens={size_tokens} and data.size_rows={size_rows} are both set: "
            "set only one of them"
        )
    for key, value in (("size_tokens", size_tokens), ("size_rows", size_rows)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value <= 0):
            raise DataError(f"data.{key} must be a positive integer, got {value!r}")


def take_budget(
    records: Sequence[Record],
    tokenizer,
    *,
    size_tokens: int | None = None,
    size_rows: int | None = None,
) -> list[Record]:
    """The longest prefix within `size_tokens`, or the first `size_rows` records, or all."""
    check_budget_args(size_tokens, size_rows)
    records = list(records)
    if size_rows is not None:
        if size_rows > len(records):
            raise DataError(
                f"data.size_rows={size_rows} but the dataset has only {len(records)} rows: "
                "lower data.size_rows or use a larger dataset"
            )
        return records[:size_rows]
    if size_tokens is None:
        return records
    cumulative = np.cumsum(count_tokens(records, tokenizer))
    total = int(cumulative[-1]) if len(cumulative) else 0
    if total < size_tokens:
        raise DataError(
            f"data.size_tokens={size_tokens} but the dataset has only {total} tokens: "
            "lower data.size_tokens or use a larger dataset"
        )
    n = int(np.searchsorted(cumulative, size_tokens, side="right"))
    if n == 0:
        raise DataError(
            f"data.size_tokens={size_tokens} is smaller than the first record "
            f"({int(cumulative[0])} tokens): raise data.size_tokens"
        )
    return records[:n]
