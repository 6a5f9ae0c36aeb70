"""Data order: shuffled epochs as a pure function of the step.

The study fed each adapter through a PyTorch `DataLoader(shuffle=True, drop_last=False)`:
every epoch a fresh permutation of the rows, cut into batches, the last one possibly partial.
`EpochStream` reproduces that order without state: epoch e's permutation is
`np.random.default_rng([seed, e]).permutation(n)`, so the batch of any step depends only on
(seed, n, batch_size, step). Resuming from a checkpoint needs nothing but the step, and each
adapter of a stacked job can have its own seed. A partial batch is filled with -1 (an empty
slot), which `gather` turns into an all-pad row with no valid or loss tokens, so batch shapes
stay static for `jit` and the loss of a partial batch averages over its real tokens only.
"""

from __future__ import annotations

import numpy as np

from jaxlora.data.encode import Encoded
from jaxlora.errors import DataError


class EpochStream:
    """Shuffled epochs like a DataLoader(shuffle=True, drop_last=False), as a pure function of the step."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        if n_rows <= 0:
            raise DataError(f"cannot stream an empty dataset (n_rows={n_rows}): check data.path")
        if batch_size <= 0:
            raise DataError(f"training.batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise DataError(f"the data-order seed must be a non-negative integer, got {seed}")
        self.n_rows, self.batch_size, self.seed = int(n_rows), int(batch_size), int(seed)
        self.steps_per_epoch = -(-self.n_rows // self.batch_size)
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """[n_rows] int64: the order of epoch `epoch`."""
        if self._cached is None or self._cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._cached = (epoch, perm)
        return self._cached[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a 0-based step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, batch = divmod(int(step), self.steps_per_epoch)
        return epoch, batch

    def indices(self, step: int) -> np.ndarray:
        """[batch_size] int64 row indices of `step`; -1 marks an empty slot."""
        epoch, batch = self.position(step)
        rows = self.permutation(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size]
        out = np.full((self.batch_size,), -1, np.int64)
        out[: len(rows)] = rows
        return out


def gather(encoded: Encoded, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, valid, loss) of rows `idx` (any shape [...]); -1 gives an all-pad, masked row."""
    idx = np.asarray(idx)
    empty = idx < 0
    safe = np.where(empty, 0, idx)
    tokens = np.where(empty[..., None], encoded.pad_id, encoded.tokens[safe]).astype(np.int32)
    valid = encoded.valid[safe] & ~empty[..., None]
    loss = encoded.loss[safe] & ~empty[..., None]
    return tokens, valid, loss
