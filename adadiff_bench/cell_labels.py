"""Short, readable names for a run's cells in progress bars and log lines.

A cell id (`Cell.cell_id`) names a folder: every knob, the solver, the step count, the seed, sometimes a hash;
it is unique and stable for resuming, and too long for a terminal line. A label keeps what tells the cells of
a run apart: the method, the settings its [[methods]] entry sweeps, and the seed when the run has several.
Where two cells would still read the same (two entries of one method that differ only in a fixed knob), both
get `#` and six hex digits of their cell id's hash.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path


def short_value(value) -> str:
    """A knob value as cell ids and labels show it: a file path by its stem, anything else as written."""
    return Path(value).stem if isinstance(value, str) and "/" in value else str(value)


def _base_label(cell, swept: list[str], several_seeds: bool) -> str:
    knobs = dict(cell.params)
    parts = [cell.method]
    for name in swept:
        if name == "solver":
            parts.append(cell.solver)
        elif name == "num_steps":
            parts.append(f"{cell.num_steps} steps")
        elif name in knobs:
            parts.append(f"{name}={short_value(knobs[name])}")
    if several_seeds:
        parts.append(f"seed {cell.seed}")
    return " ".join(parts)


def short_labels(curves: dict) -> dict:
    """{cell: label} for `curves` as `harness.plan_curves` returns it ({cell: (entry index, swept knobs)})."""
    several_seeds = len({cell.seed for cell in curves}) > 1
    labels = {cell: _base_label(cell, swept, several_seeds) for cell, (_, swept) in curves.items()}
    counts = Counter(labels.values())
    return {cell: label if counts[label] == 1 else
            f"{label} #{hashlib.sha256(cell.cell_id.encode()).hexdigest()[:6]}" for cell, label in labels.items()}
