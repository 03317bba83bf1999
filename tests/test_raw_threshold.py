"""AdaDiff skips its exact rule when a `max` of the raw values says nobody passes: that shortcut must never
hide a sample the exact rule passes.

The reference is brute force: the exact rule (`AdaDiff.exits` on `uncertainty_of_raw`) on every value.
"""
from __future__ import annotations

import numpy as np
import pytest

from adadiff_bench.methods.adadiff.estimators import Estimator, OfficialEstimator
from adadiff_bench.methods.adadiff.method import AdaDiff, AdaDiffParams
from adadiff_bench.methods.adadiff.network import AdaDiffConfig
from adadiff_bench.methods.adadiff.raw_threshold import nobody_passes_test


def rule(threshold: float, kind: str, estimator) -> AdaDiff:
    """AdaDiff's rule alone (no checkpoint) over `estimator`'s raw values."""
    method = AdaDiff.__new__(AdaDiff)
    method.params = AdaDiffParams(threshold=threshold, threshold_kind=kind, checkpoint="")
    method.net = type("Net", (), {"estimator": estimator})()
    method._quick_tests = {}
    return method


def raw_values_around(edges: list[float], generator: np.random.Generator) -> np.ndarray:
    """float32 values at, next to and around the given edges, spread over [0, 1], and the odd ones."""
    near = [np.nextafter(np.float32(e), np.float32(d), dtype=np.float32) for e in edges for d in (-1, 2)]
    steps = np.arange(-40, 41, dtype=np.int32)
    dense = [(np.array(e, np.float32).view(np.int32) + steps).view(np.float32) for e in edges]
    spread = generator.random(2000, dtype=np.float32)
    odd = np.array([0.0, 1.0, -0.0, 1e-30, 1 - 2 ** -24, np.inf, -np.inf, np.nan, 0.5], np.float32)
    return np.concatenate([np.float32(edges), near, *dense, spread, odd]).astype(np.float32)


@pytest.mark.parametrize("estimator_class", [OfficialEstimator, Estimator])  # raw = certainty / uncertainty
@pytest.mark.parametrize("kind", ["uncertainty", "official-certainty"])
def test_nobody_passes_agrees_with_the_exact_rule(estimator_class, kind, tiny_model):
    estimator = estimator_class(tiny_model, AdaDiffConfig()) if estimator_class is OfficialEstimator \
        else estimator_class.__new__(estimator_class)
    generator = np.random.default_rng(0)
    for threshold in [0.0, 1.0, 0.035, 0.045, 0.1, 0.5, 0.95, 1 - 2 ** -24, *generator.random(10)]:
        method = rule(float(threshold), kind, estimator)
        quick = method.nobody_passes()
        assert quick is not None or threshold in (0.0, 1.0), threshold
        if quick is None:
            continue
        exact = lambda raw: method.exits(estimator.uncertainty_of_raw(raw))  # noqa: E731
        edges = [float(threshold), float(1 - threshold), float(np.float32(1) - np.float32(threshold))]
        values = raw_values_around(edges, generator)
        passing = exact(values.tolist())
        for value, passes in zip(values.tolist(), passing):  # one value at a time: the edge itself
            assert quick([value]) == (not passes) or (np.isnan(value) and not passes), (threshold, value)
        for _ in range(300):  # lists, NaN among them at any place: a NaN may only cost the shortcut
            sample = generator.choice(values, int(generator.integers(1, 9))).tolist()
            nobody = not exact(sample).any()
            assert quick(sample) == nobody or (np.isnan(sample).any() and nobody), (threshold, sample)


def between_float32s(values: np.ndarray, generator: np.random.Generator) -> list[float]:
    """Doubles that are not float32 values: the midpoints of each value and its float32 neighbours (ties of
    the rounding), a hair either side of them, and random points in between (what a host division gives)."""
    finite = values[np.isfinite(values)].astype(np.float64)
    up = np.nextafter(values[np.isfinite(values)], np.float32(np.inf)).astype(np.float64)
    middle = (finite + up) / 2
    hair = np.abs(middle) * 2 ** -40
    inside = finite + (up - finite) * generator.random(len(finite))
    return np.concatenate([middle, middle - hair, middle + hair, inside]).tolist()


@pytest.mark.parametrize("kind", ["uncertainty", "official-certainty"])
def test_nobody_passes_is_safe_for_raw_values_between_float32s(kind, tiny_model):
    """The official estimator's raw values on the CPU are quotients divided in double: the exact rule reads
    their float32 rounding, and the shortcut may only answer "nobody" where that rounding fails the rule (and
    must, more than one float32 step from the edge)."""
    estimator = OfficialEstimator(tiny_model, AdaDiffConfig())
    generator = np.random.default_rng(1)
    for threshold in [0.035, 0.045, 0.1, 0.5, 0.95, *generator.random(6)]:
        method = rule(float(threshold), kind, estimator)
        quick = method.nobody_passes()
        exact = lambda raw: method.exits(estimator.uncertainty_of_raw(raw))  # noqa: E731
        edges = [float(threshold), float(1 - threshold), float(np.float32(1) - np.float32(threshold))]
        values = between_float32s(raw_values_around(edges, generator), generator)
        passing = exact(values)
        distance = np.min([np.abs(np.asarray(values) - edge) for edge in edges], axis=0)
        near = distance <= 4 * np.spacing(np.float32(1))
        for value, passes, close in zip(values, passing, near):
            if quick([value]):
                assert not passes, (threshold, value)
            else:
                assert passes or close, (threshold, value)  # the shortcut gives up only next to the edge


def test_no_edge_means_no_shortcut():
    assert nobody_passes_test(lambda raw: True) is None
    assert nobody_passes_test(lambda raw: False) is None
    assert nobody_passes_test(lambda raw: not raw > 0.3) is None  # NaN would pass: not assumed away
