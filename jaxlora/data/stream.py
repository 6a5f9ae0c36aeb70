"""Data order: shuffled epochs as a pure function of the step.

The study fed each adapter through a PyTorch `DataLoader(shuffle=True, drop_last=False)`:
every epoch a fresh permutation of the rows, cut into batches, the last one possibly partial.
`EpochStream` reproduces that order without state: epoch e's permutation is
`np.random.default_rng([seed, e]).permutation(n)`, so the batch of any step depends only on
(seed, n, batch_size, step). Resuming from a checkpoint needs nothing but the step, and each
adapter of a stacked job can have its own seed. A partial batch is filled with -1 (an empty
slot), which `gather` turns into an all-pad row with no valid or loss tokens, so batch shapes
stay static for `jit` and the loss of a partial batch averages over its real tokens only.

Packing (`pack`) lays a step's rows end to end in one sequence with segment ids, so padding
and empty slots cost nothing. It changes the layout, never the batch: the same rows, the same
targets (a row's first token is never a target, so no prediction crosses from one row into the
next), hence the same per-token mean loss. The packed length is static: the longest the step
can need, the batch's B longest rows together (`packed_length`), whatever the order.
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


def packed_length(lengths: np.ndarray, batch_size: int, multiple: int) -> int:
    """Positions a packed step of `batch_size` rows can need: its B longest rows together,
    rounded up to `multiple` (so every step of every epoch fits one static shape)."""
    top = int(np.sort(np.asarray(lengths))[::-1][:batch_size].sum())
    return max(multiple, -(-top // multiple) * multiple)


def pack(
    tokens: np.ndarray, valid: np.ndarray, loss: np.ndarray, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded rows [B, T] laid end to end: (tokens, valid, loss, segment ids), each [1,
    length]. Row i's tokens get segment id i + 1 (empty rows take none); 0 marks padding."""
    n = valid.sum(axis=1)
    if int(n.sum()) > length:
        raise DataError(f"{int(n.sum())} tokens do not fit a packed length of {length}")
    out_t = np.full((1, length), pad_id, np.int32)
    out_l = np.zeros((1, length), bool)
    seg = np.zeros((1, length), np.int32)
    at = 0
    for i, k in enumerate(n.tolist()):
        if not valid[i, :k].all():
            raise DataError("packing needs right-padded rows (real tokens first)")
        out_t[0, at : at + k], out_l[0, at : at + k] = tokens[i, :k], loss[i, :k]
        seg[0, at : at + k] = i + 1
        at += k
    return out_t, seg > 0, out_l, seg


def choose_packing(
    setting: bool | str,
    *,
    width: int,
    batch_size: int,
    length: int,
    fsdp: int,
    dropout: bool = False,
    distill: bool = False,
) -> tuple[bool, str]:
    """(pack?, why) for `training.packing`. `auto` packs when it saves at least a quarter of
    the positions of the [B, width] layout: below that, the band attention of packed rows
    (each query looks back up to a row's length plus a chunk) costs about what the padding
    does (benchmarks/README.md, "Packed batches"). With the batch split over fsdp devices a
    packed step is one sequence, which would not split, so auto keeps rows there.

    With LoRA dropout (`dropout`), the masks are drawn for the layout's shape, and a packed
    step's length depends on every cell of the job: an adapter would then differ from the same
    adapter trained alone (the one-job invariant). Auto keeps rows; `true` is an error.
    Distillation (`distill`) puts each row behind its teacher context: rows as they are."""
    if distill:
        return False, "training.objective: distill puts each row behind its teacher context"
    saved = 1 - length / (batch_size * width)
    why = f"{length} packed positions vs {batch_size} x {width} rows ({saved:.0%} saved)"
    if dropout:
        if setting is True:
            raise DataError(
                "training.packing: true with lora.dropout > 0: the dropout masks would depend on "
                "the other adapters of the job; set lora.dropout: 0 or training.packing: auto"
            )
        return False, "lora.dropout > 0: masks would depend on the packed layout"
    if setting == "auto":
        if fsdp > 1:
            return False, f"rows split over fsdp={fsdp} devices"
        return saved >= PACK_MIN_SAVING, why
    return bool(setting), why


PACK_MIN_SAVING = 0.25
