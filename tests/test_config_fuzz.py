"""Fuzzing the config validator and the cell planner: a mutated config is refused in one line or planned.

A valid run config (as `tomllib` would hand it over) is mutated at random, with a fixed seed: values
replaced by other types, negated, zeroed, made huge, NaN or infinite, emptied, turned into unicode
(NUL, right-to-left, emoji, 300 characters), lists emptied or nested, keys and whole tables removed or
added. Each mutant goes through `from_dict(RunConfig, ...)` and `plan_curves`, which must either raise
a one-line `UserError` or return a plan whose every cell is valid; any other exception fails the test
with the mutant that caused it.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import random
import traceback

import pytest

from adadiff_bench import config as config_module
from adadiff_bench.config import MAX_SEED, MAX_THREADS, SOLVERS, RunConfig, from_dict
from adadiff_bench.errors import UserError
from adadiff_bench.harness import plan_curves
from adadiff_bench.methods import get_method, make_params

MUTANTS = 3000
SEED = 16

VALID = {
    "name": "fuzz",
    "checkpoint": "checkpoints/uvit_digits.pt",
    "seeds": [0, 1],
    "results_dir": "results",
    "device": "cpu",
    "precision": "fp32",
    "data": {"name": "digits"},
    "sampling": {"solver": "ddim", "num_steps": 4, "num_samples": 16, "batch_size": 8},
    "metrics": {"inception": "off", "kid_subset_size": 8, "isc_splits": 2, "prc": True, "prc_neighborhood": 3,
                "fid_bootstrap": 0, "fid_ci": 0.9},
    "timing": {"enabled": True, "num_samples": 8, "repeats": 3, "warmup_batches": 1, "threads": 1},
    "methods": [
        {"name": "full", "num_steps": [2, 3]},
        {"name": "adadiff", "threshold": [0.1, 0.2], "threshold_kind": "uncertainty", "solver": ["ddim", "ddpm"]},
        {"name": "static-exit", "k": [2, 4]},
        {"name": "deepcache", "interval": 2},
        {"name": "teacache", "threshold": 0.1},
        {"name": "oracle", "tau": 0.05},
    ],
}

# what a value may turn into: other types, extremes, non-numbers, unicode, empty and nested containers
REPLACEMENTS = [
    0, 1, -1, -7, 2**31, 2**63, 2**64, 10**30, -(10**30),
    0.0, -0.0, 0.5, -0.5, 1e-300, 1e308, -1e308, math.nan, math.inf, -math.inf,
    True, False, "", " ", "0", "nan", "inf", "-1", "\0", "a\0b", "x" * 300, "ünïcødé", "名前", "\u202eevil", "😀",
    "../..", "/", "full", "ddim", "cuda:99", [], [[]], [0], [-1], [math.nan], ["a"], [1, "a"], [[1, 2]], [{}],
    {}, {"name": "full"}, {"x": 1}, datetime.date(2026, 12, 2), datetime.time(1, 2),
]


def paths(value, prefix=()):
    """Every place in a nested config: (keys and list indices from the top, ...)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def mutate(config: dict, rng: random.Random) -> None:
    """One random change at one random place (never the whole config)."""
    path = rng.choice([p for p in paths(config) if p])
    parent = config
    for step in path[:-1]:
        parent = parent[step]
    key, value = path[-1], parent[path[-1]]
    action = rng.choice(["replace", "replace", "replace", "number", "number", "delete", "add key", "wrap", "duplicate"])
    if action == "delete":
        del parent[key]
    elif action == "add key" and isinstance(value, dict):
        value[rng.choice(["extra", "seed", "num_step", "name", "tréshold", ""])] = rng.choice(REPLACEMENTS)
    elif action == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = rng.choice([-value, 0, value * 10**12, value + 0.5, value * 1.0, math.nan, math.inf, -math.inf])
    elif action == "wrap":
        parent[key] = rng.choice([[value], [value, value], {"value": value}])
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(value))
    else:
        parent[key] = copy.deepcopy(rng.choice(REPLACEMENTS))


def numbers(value):
    """Every int and float inside a nested value (a config as plain data, a cell's knobs)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ():
        yield from numbers(item)


def check_plan(config: RunConfig, plan: dict) -> None:
    """A plan that may run: finite numbers throughout, bounded threads, and cells of registered methods with
    valid knobs, solvers, step counts and seeds."""
    assert plan, "a plan without cells"
    assert all(math.isfinite(number) for number in numbers(dataclasses.asdict(config))), config
    assert 1 <= config.timing.threads <= MAX_THREADS and config.timing.warmup_batches >= 0, config.timing
    for cell in plan:
        make_params(get_method(cell.method), dict(cell.params), "plan")
        assert all(math.isfinite(number) for number in numbers(dict(cell.params))), cell
        assert cell.solver in SOLVERS and 0 < cell.num_steps <= 1000 and 0 <= cell.seed <= MAX_SEED, cell


def outcome(raw: dict) -> str:
    """"planned", or the one line a UserError gave; any other exception propagates."""
    try:
        config = from_dict(RunConfig, raw, "fuzz.toml")
        check_plan(config, plan_curves(config, "fuzz.toml"))
        return "planned"
    except UserError as error:
        assert "\n" not in str(error) and str(error), repr(str(error))
        return str(error)


def test_the_valid_config_plans():
    assert outcome(copy.deepcopy(VALID)) == "planned"


def mutants(count: int, seed: int):
    """`count` mutants of the valid config, each changed in one to three places."""
    rng = random.Random(seed)
    for _ in range(count):
        raw = copy.deepcopy(VALID)
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutate(raw, rng)
        yield raw


def test_mutated_configs_give_one_line_or_a_valid_plan():
    outcomes = {"planned": 0, "refused": 0}
    for index, raw in enumerate(mutants(MUTANTS, SEED)):
        try:
            result = outcome(raw)
        except Exception:  # noqa: BLE001 (any other exception is the failure being looked for)
            pytest.fail(f"mutant {index} raised instead of a one-line UserError:\n{raw!r}\n{traceback.format_exc()}")
        outcomes["planned" if result == "planned" else "refused"] += 1
    assert outcomes["planned"] > MUTANTS // 20 and outcomes["refused"] > MUTANTS // 2  # both paths exercised


def test_the_fuzzer_catches_a_validator_that_lets_nan_through(monkeypatch):
    """The test above can fail: without the finiteness check, some mutant plans with a NaN or inf in it."""
    monkeypatch.setattr(config_module, "_check_finite", lambda value, where: None)
    caught = 0
    for raw in mutants(MUTANTS, SEED):
        try:
            outcome(raw)
        except AssertionError:
            caught += 1
    assert caught > 0
