"""T_max(tau), the saturation capacity of one configuration, and its efficiency.

T_max is the largest knowledge size (training tokens) whose accuracy is still >= tau, read off
the accuracy-vs-size curve (`saturation_capacity`; the rule and its edge cases are in its
docstring). It is a `Capacity`, a value plus how it was obtained, because a grid often
brackets the answer only from one side: "still >= tau at the largest size" (`>= 20,000`) and
"below tau at the smallest" (`< 1,000`) are bounds, not measurements. `efficiency` is T_max
per trainable parameter. The capacity report (`jaxlora/report.py`) builds its table, figures
and markdown on these.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jaxlora.errors import DataError

CapacityKind = Literal["interpolated", "at_least", "below", "exact"]

# Accuracies are ratios of counts; a float rounding error must not decide whether tau is hit.
_TAU_TOL = 1e-9


@dataclass(frozen=True)
class Capacity:
    """A saturation capacity in tokens and how it was read off the curve.

    kind: "interpolated" (between a size >= tau and the next one below it), "exact" (a measured
    size hits tau and the next one falls below), "at_least" (still >= tau at the largest size:
    a lower bound), "below" (under tau already at the smallest size: `value` is that size, an
    upper bound). `value` is None only when there is nothing to measure.
    """

    value: float | None
    kind: CapacityKind

    @property
    def is_bound(self) -> bool:
        """True when the grid brackets T_max from one side only."""
        return self.kind in ("at_least", "below")

    def __str__(self) -> str:
        if self.value is None:
            return "n/a"
        number = f"{round(self.value):,}"
        return {"at_least": f">= {number}", "below": f"< {number}"}.get(self.kind, number)


def mean_by_size(sizes: Sequence[float], values: Sequence[float]) -> dict[float, float]:
    """Mean value per size, sizes ascending (duplicates, e.g. seeds, are averaged)."""
    if len(sizes) != len(values):
        raise DataError(f"{len(sizes)} sizes but {len(values)} accuracies; pass one per size")
    buckets: dict[float, list[float]] = defaultdict(list)
    for size, value in zip(sizes, values, strict=True):
        if not math.isfinite(size):
            raise DataError(f"knowledge size {size!r} is not a finite number of tokens")
        if not math.isfinite(value):
            raise DataError(
                f"accuracy at size {size:,} is {value!r}; re-run that evaluation or drop the row"
            )
        buckets[size].append(float(value))
    return {s: math.fsum(v) / len(v) for s, v in sorted(buckets.items())}


def saturation_capacity(
    sizes: Sequence[float], accuracies: Sequence[float], tau: float = 0.95
) -> Capacity:
    """T_max(tau): the largest knowledge size (tokens) whose accuracy is >= tau.

    The (size, accuracy) pairs are sorted by size; duplicate sizes are averaged. With s_i the
    LAST size whose accuracy reaches tau (accuracies within 1e-9 of tau count as reaching it):

    - no size reaches tau -> `Capacity(smallest size, "below")`, printed "< smallest";
    - s_i is the largest size -> `Capacity(largest size, "at_least")`, printed ">= largest"
      (the curve has not come down yet, so only a lower bound is known);
    - acc_i equals tau -> `Capacity(s_i, "exact")`;
    - otherwise the crossing is interpolated linearly toward the next size, which is below tau:
      T = s_i + (acc_i - tau) / (acc_i - acc_{i+1}) * (s_{i+1} - s_i), kind "interpolated".

    Non-monotone curves (a dip below tau and a recovery) are read at the last crossing, as the
    definition says "largest size". A NaN accuracy is an error (DataError), never skipped: a
    missing evaluation would otherwise move T_max silently.
    """
    if not math.isfinite(tau):
        raise DataError(f"tau must be a finite number, got {tau!r}")
    curve = mean_by_size(sizes, accuracies)
    if not curve:
        raise DataError("no (size, accuracy) points; the capacity of an empty curve is undefined")
    xs, ys = list(curve), list(curve.values())
    reached = [i for i, y in enumerate(ys) if y >= tau - _TAU_TOL]
    if not reached:
        return Capacity(xs[0], "below")
    i = reached[-1]
    if i == len(xs) - 1:
        return Capacity(xs[-1], "at_least")
    if abs(ys[i] - tau) <= _TAU_TOL:
        return Capacity(xs[i], "exact")
    # ys[i+1] < tau <= ys[i], so the denominator is positive.
    frac = (ys[i] - tau) / (ys[i] - ys[i + 1])
    return Capacity(xs[i] + frac * (xs[i + 1] - xs[i]), "interpolated")


def efficiency(capacity: Capacity, trainable_params: int) -> float | None:
    """Tokens stored per trainable parameter, T_max / params (a lower bound for "at_least")."""
    if trainable_params <= 0:
        raise DataError(f"trainable_params must be positive, got {trainable_params}")
    if capacity.kind == "below" or capacity.value is None:
        return None
    return capacity.value / trainable_params
