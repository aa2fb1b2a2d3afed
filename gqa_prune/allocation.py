"""How much each layer loses: pure functions on plain numbers, no tensors.

Width mode (today's plans):

1. ``layer_pressure``: relative pruning pressure per layer. Importance is normalised by its mean;
   ``inverse`` uses z^-alpha (important layers lose less), ``proportional`` z^alpha, ``uniform`` 1.
   alpha sets the contrast (0 gives uniform).
2. ``continuous_rates``: rate_i = clip(c * pressure_i, min_rate, max_rate), with c found by bisection so
   that the rates remove exactly ``target`` of all units (protected layers keep everything).
3. ``discretize``: each layer can only remove certain amounts (whole GQA groups; MLP widths that stay
   multiples of channel_multiple; at least one unit kept). Start from the largest allowed amount below each
   layer's continuous share, then hand out further steps by largest unfilled fraction while that brings
   the total closer to the target. ``uniform`` instead rounds every layer to its nearest option, so layers
   of equal shape stay equal (the achieved ratio may then differ from the target; the plan records it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

from .choices import STRATEGIES  # noqa: E402
from .errors import GqaPruneError, SettingError

_EPSILON = 1e-6


def layer_pressure(importance: Sequence[float], strategy: str, alpha: float) -> list[float]:
    """Relative pruning pressure of each layer (any positive scale)."""
    if strategy not in STRATEGIES:
        raise GqaPruneError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "uniform" or not importance:
        return [1.0] * len(importance)
    floor = min(importance)
    shifted = [value - floor if floor < 0 else value for value in importance]  # removal scores may dip below 0
    mean = sum(shifted) / len(shifted)
    if mean <= 0:
        return [1.0] * len(importance)
    normalised = [max(value / mean, _EPSILON) for value in shifted]
    exponent = -alpha if strategy == "inverse" else alpha
    return [value**exponent for value in normalised]


def continuous_rates(
    pressure: Sequence[float],
    units: Sequence[int],
    prunable: Sequence[bool],
    target: float,
    min_rate: float,
    max_rate: float,
    what: str,
) -> list[float]:
    """Per-layer rates in [min_rate, max_rate] (0 where not prunable) removing ``target`` of all units."""
    if target == 0:
        return [0.0] * len(units)
    total = sum(units)
    goal = target * total
    open_units = sum(n for n, ok in zip(units, prunable) if ok)
    if max_rate * open_units < goal - 1e-9:
        raise GqaPruneError(
            f"{what} ratio {target} is infeasible: with max_rate {max_rate} the prunable layers can lose at most "
            f"{max_rate * open_units / total:.3f} of all {what} units; raise max_rate or unprotect layers"
        )
    if min_rate * open_units > goal + 1e-9:
        raise GqaPruneError(
            f"{what} ratio {target} is below what min_rate {min_rate} already removes "
            f"({min_rate * open_units / total:.3f}); lower min_rate"
        )

    def rates(scale: float) -> list[float]:
        return [min(max(scale * p, min_rate), max_rate) if ok else 0.0 for p, ok in zip(pressure, prunable)]

    def removed(scale: float) -> float:
        return sum(rate * n for rate, n in zip(rates(scale), units))

    low, high = 0.0, 1.0
    while removed(high) < goal and high < 1e12:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        low, high = (middle, high) if removed(middle) < goal else (low, middle)
    return rates(high)


def removal_options(units: int, step: int, max_removed: float, min_kept: int) -> list[int]:
    """Allowed amounts to remove from a layer of ``units``: kept sizes are multiples of ``step`` (or all)."""
    kept_sizes = [units] + [k * step for k in range(units // step, 0, -1) if k * step < units]
    options = [
        units - kept for kept in kept_sizes if kept >= min(min_kept, units) and units - kept <= max_removed + 1e-9
    ]
    return sorted(set(options))


def discretize(desired: Sequence[float], options: Sequence[Sequence[int]], goal: float, uniform: bool) -> list[int]:
    """Pick one allowed amount per layer so the total is as close to ``goal`` as the options allow."""
    if uniform:
        return [min(layer_options, key=lambda o, d=d: (abs(o - d), o)) for layer_options, d in zip(options, desired)]
    choice = [
        max((o for o in layer_options if o <= d + 1e-9), default=layer_options[0])
        for layer_options, d in zip(options, desired)
    ]
    total = sum(choice)
    while True:
        best, best_key = None, None
        for layer, (layer_options, d) in enumerate(zip(options, desired)):
            larger = [o for o in layer_options if o > choice[layer]]
            if not larger:
                continue
            step = larger[0] - choice[layer]
            fill = (d - choice[layer]) / step  # how much of the next step this layer "deserves"
            key = (fill, layer)  # ties go to the later layer
            if best_key is None or key > best_key:
                best, best_key = (layer, larger[0]), key
        if best is None:
            break
        layer, amount = best
        new_total = total - choice[layer] + amount
        if abs(new_total - goal) >= abs(total - goal):
            break
        choice[layer], total = amount, new_total
    return choice


def check_rate_bounds(ratio: float, name: str, field: str = "ratio") -> None:
    """Refuse a fraction to remove outside [0, 1); ``field`` is the settings field it came from."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise SettingError(
            f"{name} {ratio!r} is outside [0, 1): give the fraction of parameters to remove, e.g. 0.2", field=field
        )


# ------------------------------------------------------------------------------------------ hybrid
def split_by_curves(
    curves: dict[str, Callable[[float], float]], limits: dict[str, float], target: float, step: float
) -> dict[str, float]:
    """Parameters to take from each kind so the summed loss is lowest: hand out ``step`` at a time to the
    kind whose loss rises least per parameter (optimal when each curve is convex, as loss-curve hulls are).

    ``curves[kind](params)`` is the loss of removing ``params`` of that kind, ``limits[kind]`` the most it
    can give. Returns kind -> parameters (their sum is ``target``, or everything the limits allow).
    """
    taken = {kind: 0.0 for kind in curves}
    remaining = target
    while remaining > 1e-9:
        best, best_price = None, None
        for kind, loss in curves.items():
            amount = min(step, remaining, limits[kind] - taken[kind])
            if amount <= 1e-9:
                continue
            price = (loss(taken[kind] + amount) - loss(taken[kind])) / amount
            if best_price is None or price < best_price:
                best, best_price = (kind, amount), price
        if best is None:
            break
        kind, amount = best
        taken[kind] += amount
        remaining -= amount
    return taken


def split_by_steps(
    curves: dict[Hashable, Callable[[float], float]],
    steps: dict[Hashable, Sequence[float]],
    target: float,
    wholes: dict[Hashable, Sequence[Hashable]] | None = None,
) -> dict[Hashable, int]:
    """How many steps to take from each candidate (e.g. a kind of unit in one layer) so that about ``target``
    parameters go at the lowest summed loss: one step at a time from the candidate whose loss rises least per
    parameter (optimal when each curve is convex, as loss-curve hulls are).

    ``steps[key]`` are the parameters removed after 1, 2, ... steps of that candidate (ascending; its last is
    the most it can give; none: never a candidate, its curve is never called), ``curves[key](params)`` the loss
    of removing ``params`` (0 at 0). A step is taken only while
    at least half of it fits in what remains of the target, so the total lands within half a step of it.
    ``wholes`` maps a candidate that removes a whole (e.g. a layer, one step) to the candidates it contains: its
    step is priced by what it adds to theirs taken so far (loss and parameters), and once taken they stop and
    count no step (the whole includes them). Returns key -> steps taken (ties: the candidate listed first).
    """
    wholes = wholes or {}
    taken = {key: 0 for key in curves}
    closed: set[Hashable] = set()

    def removed(key: Hashable) -> float:
        return steps[key][taken[key] - 1] if taken[key] else 0.0

    def next_step(key: Hashable) -> tuple[float, float]:
        """(parameters, loss increase) of the candidate's next step."""
        if key in wholes:
            parts = [part for part in wholes[key] if taken.get(part)]  # a part's curve passes (0, 0)
            size = steps[key][0] - sum(removed(part) for part in parts)
            return size, curves[key](steps[key][0]) - sum(curves[part](removed(part)) for part in parts)
        return steps[key][taken[key]] - removed(key), curves[key](steps[key][taken[key]]) - curves[key](removed(key))

    remaining = target
    while True:
        best, best_price, best_size = None, None, 0.0
        for key in curves:
            if key in closed or taken[key] >= len(steps[key]):
                continue
            size, increase = next_step(key)
            if size <= 0 or size > 2 * remaining + 1e-9:
                continue
            if best_price is None or increase / size < best_price:
                best, best_price, best_size = key, increase / size, size
        if best is None:
            return taken
        remaining -= best_size
        taken[best] += 1
        if best in wholes:
            closed.update([best, *wholes[best]])
            taken.update({part: 0 for part in wholes[best] if part in taken})
