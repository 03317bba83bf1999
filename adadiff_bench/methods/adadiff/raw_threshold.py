"""Whether any sample passes AdaDiff's threshold, tested on an estimator's raw values by one `max` or `min`.

After every block AdaDiff asks whether any active sample passes its threshold, and most of the time none
does. The exact rule (`AdaDiff.exits`) runs on float32 uncertainties that the host derives from the
estimator's raw values by a monotone map (`Estimator.uncertainty_of_raw`: it rounds them to float32 first),
and it passes a sample when its uncertainty lies on one side of the threshold. So the float32 raw values
that pass are those on one side of one edge. The edge is found once per threshold, by bisection over the
float32 values in their order with the exact rule as the test; "nobody passes" is then one comparison of the
largest raw value with the last float32 value that fails (of the smallest with the first that fails, where
the small values pass), which costs no op, no array and no float32 arithmetic. A raw value that is not a
float32 value (a quotient the host divided in double) and lies on the failing side of that bound rounds to a
failing value, so the test is exact for float32 values and safe for the others; one less than a float32 step
from the edge is left to the exact rule, as is anything where somebody may pass.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

_INF_BITS = 0x7F800000  # the bit pattern of +inf; -inf is the same with the sign bit set


def nobody_passes_test(passes: Callable[[float], bool]) -> Callable[[list[float]], bool] | None:
    """A test of raw values that answers True only when `passes` is False for every one of them.

    `passes(raw)`: the exact rule on one float32 raw value, monotone in it. None where no edge exists (every
    value passes, or none does) or where NaN would pass (the quick test assumes it never does)."""
    passes_low, passes_high = passes(-np.inf), passes(np.inf)
    if passes_low == passes_high or passes(float("nan")):
        return None
    low, high = -_INF_BITS, _INF_BITS  # order keys of -inf and +inf; passes differs at the two ends
    while high - low > 1:  # keep passes(low) == passes_low and passes(high) == passes_high
        middle = (low + high) // 2
        if passes(_float32_at(middle)) == passes_low:
            low = middle
        else:
            high = middle
    # max / min skip a NaN after a number and return a NaN met first, which fails the comparison: the
    # answer is then "somebody may pass", and the exact rule decides.
    if passes_high:  # the passing float32 values are [high, inf]; `low` is the last that fails
        last_failing = _float32_at(low)
        return lambda raw: max(raw) <= last_failing
    first_failing = _float32_at(high)  # the passing float32 values are [-inf, low]
    return lambda raw: min(raw) >= first_failing


def _float32_at(key: int) -> float:
    """The float32 value at order key `key` (0 is +0.0, positive keys are the positive floats' bit patterns,
    negative keys the negative floats', mirrored), as a Python float."""
    bits = key if key >= 0 else 0x80000000 | -key
    return float(np.array(bits, dtype=np.uint32).view(np.float32))
