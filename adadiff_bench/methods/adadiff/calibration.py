"""Thresholds at matched compute: find the exit threshold that reaches a target layer ratio.

AdaDiff's knob `target_layer_ratio` replaces a fixed `threshold`: before any sampling, the harness
hands the method a function that samples a small calibration set with given knobs (the cell's own
solver, steps, schedule and guidance) and returns the layer ratio those samples realised. The search
below bisects the threshold on that real, closed-loop ratio (an exit changes the trajectory, so the
ratio is measured, never predicted from logged uncertainties), then the cell samples at the threshold
it found. The exit rule itself is untouched: a found threshold is used exactly as a given one.

Seed rule: calibration samples are drawn with the run seed `calibration_seed` (default 2**31 - 1), and
a run whose `seeds` list that seed is refused, so no calibration image is ever an evaluation image.

A target the estimator cannot reach is reported, not hidden: a saturated estimator jumps from ratio 1.0
straight to near its first exit point, and every threshold lands on one side of the jump. The search
then brackets the jump to `RESOLUTION` and reports the two ratios on either side of the target.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_CALIBRATION_SEED = 2**31 - 1
RESOLUTION = 2.0 ** -20     # the bisection stops when the bracket is this narrow (below float32's step near 1)
MAX_EVALUATIONS = 24        # 2 ends + at most 22 bisection steps (2**-22 < RESOLUTION)


@dataclass(frozen=True)
class Evaluation:
    threshold: float
    layer_ratio: float


@dataclass(frozen=True)
class ThresholdSearch:
    """The outcome of one search: the threshold used, what it reached, and the bracket around the target."""
    target: float
    tolerance: float
    threshold: float          # the evaluated threshold whose ratio came nearest the target
    layer_ratio: float        # the ratio it reached on the calibration set
    reached: bool             # |layer_ratio - target| <= tolerance
    ratio_above: float        # the nearest ratio evaluated at or above the target (more compute), and
    ratio_below: float        # at or below it: where the target is unreachable, the two sides of the jump
    evaluations: tuple[Evaluation, ...]

    def row_fields(self) -> dict:
        """Columns of a results row (units in the names: layer ratios are fractions of the blocks)."""
        return {"target_layer_ratio": self.target, "calibrated_threshold": self.threshold,
                "calibration_layer_ratio": self.layer_ratio, "target_reached": self.reached,
                "target_tolerance": self.tolerance, "nearest_layer_ratio_above": self.ratio_above,
                "nearest_layer_ratio_below": self.ratio_below, "calibration_runs": len(self.evaluations)}


def find_threshold(layer_ratio_at: Callable[[float], float], target: float, tolerance: float,
                   exits_grow_with_threshold: bool = True) -> ThresholdSearch:
    """Bisect the threshold in [0, 1] for `layer_ratio_at(threshold)` ~ `target`.

    `exits_grow_with_threshold`: True when a larger threshold lets more samples exit (uncertainty <= t),
    False for the official certainty rule (1 - u > t). The search works on a position p in [0, 1] whose
    ratio does not grow with p; the bracket keeps ratio(low) >= target >= ratio(high), so it closes on
    the target or on the jump across it even where sampling makes the ratio not quite monotonic.
    """
    evaluations: list[Evaluation] = []

    def ratio_at(position: float) -> float:
        threshold = position if exits_grow_with_threshold else 1.0 - position
        evaluations.append(Evaluation(threshold, float(layer_ratio_at(threshold))))
        return evaluations[-1].layer_ratio

    low, high = 0.0, 1.0
    ratio_low, ratio_high = ratio_at(low), ratio_at(high)
    if ratio_high <= target <= ratio_low:
        while (min(abs(ratio_low - target), abs(ratio_high - target)) > tolerance
               and high - low > RESOLUTION and len(evaluations) < MAX_EVALUATIONS):
            middle = (low + high) / 2
            ratio = ratio_at(middle)
            if ratio >= target:
                low, ratio_low = middle, ratio
            else:
                high, ratio_high = middle, ratio
    best = min(evaluations, key=lambda e: (abs(e.layer_ratio - target), -e.layer_ratio))
    above = [e.layer_ratio for e in evaluations if e.layer_ratio >= target]
    below = [e.layer_ratio for e in evaluations if e.layer_ratio <= target]
    return ThresholdSearch(target, tolerance, best.threshold, best.layer_ratio,
                           abs(best.layer_ratio - target) <= tolerance,
                           min(above) if above else float("nan"), max(below) if below else float("nan"),
                           tuple(evaluations))
