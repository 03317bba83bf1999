"""Metric specs: what each quality metric is called, which columns it writes, which way is better.

One registration per metric feeds every place that needs to know about it: the harness computes
it in every feature space (`compute`), the results get its columns, the leaderboard its header,
arrow, number format and seed aggregation, and the run's progress line its headline value.

A metric reports one or more *quantities* (precision and recall come from one k-NN pass). A
quantity's value column is `<name>_<space><suffix>`, the feature space in the middle, as in
`fid_digits_cnn` or `is_inception_mean`; a spread within the run goes in `<name>_<space>_std`,
a bootstrap interval in `<name>_<space>_ci_low` / `_ci_high`.

This module imports neither torch nor torch-fidelity (reports read it); the compute functions of
the built-in metrics import torch-fidelity when they are called.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SPREAD, CI_LOW, CI_HIGH, SEED_STD = "_std", "_ci_low", "_ci_high", "_seed_std"
DERIVED_SUFFIXES = (SPREAD, CI_LOW, CI_HIGH, SEED_STD)  # not a metric's value: its spread, interval, std across seeds
FEATURE_ROLES = ("fid", "isc", "kid", "prc")  # the feature layers torch-fidelity resolves per extractor
PIXELS = "pixels"  # a metric that reads the images themselves: computed once per cell, its space named "pixels"


@dataclass(frozen=True)
class Quantity:
    """One number a metric reports in each feature space: one leaderboard column."""
    name: str                   # column prefix: "fid"
    label: str                  # header: "FID"
    higher_is_better: bool
    suffix: str = ""            # "_mean" where the metric also reports a spread ("_std") within the run
    decimals: int = 3           # digits after the point in tables
    states_n: bool = False      # the header states n (FID depends strongly on the number of samples)
    headline: bool = False      # printed after each cell in the run's progress line

    def column(self, space: str, tail: str = "") -> str:
        """`<name>_<space><suffix>` (or another tail such as `_std`): the column in one feature space."""
        return f"{self.name}_{space}{tail or self.suffix}"


@dataclass(frozen=True)
class MetricSpec:
    """A quality metric: its quantities, the feature layer it reads, and how it is computed.

    `compute(space)` receives one feature space's extracted features (`adadiff_bench.metrics.quality.
    FeatureSpace`) and returns {quantity name + tail: value}, e.g. {"is_mean": 6.8, "is_std": 0.4} or
    {"precision": 0.6, "recall": 0.8}; the harness puts the space's name into each column.
    A metric whose `feature` is PIXELS reads the images, not features: it is computed once per cell, and
    `compute(space)` receives a `quality.PixelSpace` (`samples`, `reference`, `config`); its columns
    are named with the space "pixels" (`swd_pixels`).
    `enabled(metrics_config)` says whether a run computes it; `seeds` is how several seeds aggregate
    in the leaderboard (a pandas aggregation: "mean" or "median"; the std across seeds is shown too).
    """
    name: str
    quantities: tuple[Quantity, ...]
    feature: str                                   # one of FEATURE_ROLES (the extractor layer it reads), or PIXELS
    compute: Callable[[Any], dict[str, float]] | None
    enabled: Callable[[Any], bool] = field(default=lambda config: True)
    seeds: str = "mean"
    primary: bool = False                          # the quality column leaderboards rank by (FID)
    stand_in: bool = False                         # ranks them instead where no primary metric was computed (SWD)


_METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric; a malformed spec, a taken name or a clash with another metric's quantity is refused."""
    if not spec.name.isidentifier() or not spec.quantities:
        raise ValueError(f"metric {spec.name!r}: a name like 'fid' and at least one quantity are needed")
    if spec.feature not in (*FEATURE_ROLES, PIXELS):
        raise ValueError(f"metric {spec.name!r}: feature must be one of {', '.join((*FEATURE_ROLES, PIXELS))} "
                         f"(got {spec.feature!r})")
    if spec.seeds not in ("mean", "median"):
        raise ValueError(f"metric {spec.name!r}: seeds must be 'mean' or 'median' (got {spec.seeds!r})")
    if (spec.primary or spec.stand_in) and (len(spec.quantities) != 1 or spec.quantities[0].higher_is_better):
        raise ValueError(f"metric {spec.name!r}: a metric that ranks leaderboards (primary, stand_in) has one "
                         "quantity, lower is better")
    if spec.name in _METRICS and _METRICS[spec.name] is not spec:
        raise ValueError(f"metric {spec.name!r} is already registered")
    taken = {q.name for other in _METRICS.values() if other.name != spec.name for q in other.quantities}
    for quantity in spec.quantities:
        if not quantity.name.isidentifier() or quantity.name in taken:
            raise ValueError(f"metric {spec.name!r}: quantity {quantity.name!r} is malformed or taken")
    _METRICS[spec.name] = spec
    return spec


def metric_specs() -> list[MetricSpec]:
    """Every registered metric, in registration order."""
    return list(_METRICS.values())


def quantities() -> list[tuple[MetricSpec, Quantity]]:
    return [(spec, q) for spec in _METRICS.values() for q in spec.quantities]


# ---- reading columns -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedColumn:
    metric: MetricSpec
    quantity: Quantity
    space: str
    tail: str  # the quantity's suffix for its value column, else a derived suffix

    @property
    def is_value(self) -> bool:
        return self.tail == self.quantity.suffix


def parse_column(column: str) -> ParsedColumn | None:
    """Which metric, quantity and feature space a results column belongs to (None: not a quality column)."""
    for spec, quantity in sorted(quantities(), key=lambda item: -len(item[1].name)):
        head = quantity.name + "_"
        if not column.startswith(head):
            continue
        rest = column[len(head):]
        for tail in sorted({quantity.suffix, *DERIVED_SUFFIXES, *(quantity.suffix + s for s in DERIVED_SUFFIXES)},
                           key=len, reverse=True):
            if tail and rest.endswith(tail) and len(rest) > len(tail):
                return ParsedColumn(spec, quantity, rest[: -len(tail)], tail)
        if not quantity.suffix and rest:
            return ParsedColumn(spec, quantity, rest, "")
    return None


def is_value_column(column: str) -> bool:
    """A quality metric's value column (not its spread, its bootstrap bounds or its std across seeds)."""
    parsed = parse_column(column)
    return parsed is not None and parsed.is_value


def primary_column(columns) -> str | None:
    """The column leaderboards rank by (Pareto marks, dFID, matched tables): the primary metric's value in the first
    feature space present; where no primary metric was computed (no feature space read the images), a stand-in's."""
    values = [(column, parsed) for column, parsed in ((c, parse_column(c)) for c in columns)
              if parsed is not None and parsed.is_value]
    for wanted in ("primary", "stand_in"):
        found = next((column for column, parsed in values if getattr(parsed.metric, wanted)), None)
        if found is not None:
            return found
    return None


def ranking_label(column: str) -> str:
    """The short name of the metric a ranking column holds: "FID", or "SWD" where it stands in."""
    return parse_column(column).quantity.label


def delta_column(column: str) -> str:
    """The name of a ranking column's difference to its group's `full` row: "dfid" for FID, "dswd" for SWD."""
    return "d" + parse_column(column).quantity.name


def delta_quantity(column: str) -> Quantity | None:
    """The ranking quantity whose difference to `full` a column holds ("dfid": FID's), or None."""
    return next((spec.quantities[0] for spec in _METRICS.values()
                 if (spec.primary or spec.stand_in) and column == "d" + spec.quantities[0].name), None)


def headline_columns(columns) -> list[str]:
    """The value columns printed after each cell."""
    found = [(column, parse_column(column)) for column in columns]
    return [c for c, parsed in found if parsed is not None and parsed.is_value and parsed.quantity.headline]


# ---- the built-in metrics: torch-fidelity's FID, IS, KID and precision/recall ----------------------

def _fidelity(function: str, *args, **kwargs) -> dict:
    """Call one of torch-fidelity's metric functions by module path (imported only when a metric is computed)."""
    import importlib
    module, name = function.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def compute_fid(space) -> dict[str, float]:
    """FID by torch-fidelity (or clean-fid, `fid_backend`), with a bootstrap interval when asked for."""
    from torch_fidelity import KEY_METRIC_FID
    samples = space.features.samples
    layer = space.features.layers["fid"]
    statistics = _fidelity("torch_fidelity.metric_fid.fid_featuresdict_to_statistics", samples, layer)
    values = {"fid": _fidelity("torch_fidelity.metric_fid.fid_statistics_to_metric", statistics,
                               space.reference_statistics(), False)[KEY_METRIC_FID]}
    if space.config.fid_backend == "clean-fid":
        values["fid"] = space.cleanfid_fid()
    if space.config.fid_bootstrap:
        from .bootstrap import basic_interval, fid_bootstrap_replicates
        point, replicates = fid_bootstrap_replicates(samples[layer], space.reference_statistics(),
                                                     space.config.fid_bootstrap)
        low, high = basic_interval(point, replicates, space.config.fid_ci)
        values.update({"fid" + CI_LOW: low, "fid" + CI_HIGH: high})
        space.kept["fid"] = {"point": point, "replicates": replicates}  # for paired comparisons
    return values


def compute_is(space) -> dict[str, float]:
    from torch_fidelity import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD
    raw = _fidelity("torch_fidelity.metric_isc.isc_featuresdict_to_metric", space.features.samples,
                    space.features.layers["isc"], **space.kwargs)
    return {"is_mean": raw[KEY_METRIC_ISC_MEAN], "is_std": raw[KEY_METRIC_ISC_STD]}


def compute_kid(space) -> dict[str, float]:
    from torch_fidelity import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
    raw = _fidelity("torch_fidelity.metric_kid.kid_featuresdict_to_metric", space.features.samples,
                    space.features.reference, space.features.layers["kid"], **space.kwargs)
    return {"kid_mean": raw[KEY_METRIC_KID_MEAN], "kid_std": raw[KEY_METRIC_KID_STD]}


def compute_prc(space) -> dict[str, float]:
    from torch_fidelity import KEY_METRIC_PRECISION, KEY_METRIC_RECALL
    raw = _fidelity("torch_fidelity.metric_prc.prc_featuresdict_to_metric", space.features.samples,
                    space.features.reference, space.features.layers["prc"], **space.kwargs)
    return {"precision": raw[KEY_METRIC_PRECISION], "recall": raw[KEY_METRIC_RECALL]}


register_metric(MetricSpec("fid", (Quantity("fid", "FID", False, states_n=True, headline=True),), "fid",
                           compute_fid, primary=True))
register_metric(MetricSpec("is", (Quantity("is", "IS", True, suffix="_mean", headline=True),), "isc", compute_is))
register_metric(MetricSpec("kid", (Quantity("kid", "KID", False, suffix="_mean", decimals=4),), "kid", compute_kid))
register_metric(MetricSpec("prc", (Quantity("precision", "precision", True), Quantity("recall", "recall", True)),
                           "prc", compute_prc, enabled=lambda config: config.prc))


def compute_swd(space) -> dict[str, float]:
    """Sliced Wasserstein distance over Laplacian-pyramid patches (`swd`), with the run's own projection seed."""
    from .swd import sliced_wasserstein_patches
    return {"swd": sliced_wasserstein_patches(space.samples, space.reference.images, space.config.swd_seed,
                                              space.config.swd_projections)}


register_metric(MetricSpec("swd", (Quantity("swd", "SWD", False, decimals=4),), PIXELS, compute_swd,
                           enabled=lambda config: config.swd != "off", stand_in=True))
