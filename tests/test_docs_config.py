"""docs/config.md is generated from the dataclasses and kept up to date; it covers every key and knob."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

from adadiff_bench.config import RunConfig, TrainFile
from adadiff_bench.docs_config import (NOT_KEYS, REGENERATE, RUN_TABLES, TRAIN_TABLES, builtin_methods,
                                       config_markdown)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "config.md"


def test_committed_reference_is_up_to_date():
    assert COMMITTED.read_text() == config_markdown(), f"docs/config.md is out of date; regenerate it: {REGENERATE}"


def test_the_module_prints_the_same_text():
    printed = subprocess.run([sys.executable, "-m", "adadiff_bench.docs_config"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    assert printed == config_markdown()


def _nested_tables(cls: type) -> set[type]:
    """Every dataclass reachable from `cls` through its fields (`X`, `X | None`, `list[X]`)."""
    found = {cls}
    for hint in typing.get_type_hints(cls).values():
        for candidate in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(candidate) and candidate not in found:
                found |= _nested_tables(candidate)
    return found


def test_every_table_of_run_and_training_configs_is_documented():
    run_documented = {cls for _, cls, _ in RUN_TABLES}
    assert _nested_tables(RunConfig) <= run_documented, \
        f"tables missing from docs_config.RUN_TABLES: {_nested_tables(RunConfig) - run_documented}"
    train_documented = {cls for _, cls, _ in TRAIN_TABLES} | {TrainFile}
    assert _nested_tables(TrainFile) <= train_documented, \
        f"tables missing from docs_config.TRAIN_TABLES: {_nested_tables(TrainFile) - train_documented}"


def _section(text: str, heading: str) -> str:
    """The text under `### heading` up to the next heading."""
    start = text.index(f"### {heading}\n")
    end = text.find("\n#", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_every_key_and_knob_is_a_row_of_its_table():
    text = config_markdown()
    run_part, train_part = text.split("## Training configs")
    train_part, methods_part = train_part.split("## Method knobs")
    for part, tables in ((run_part, RUN_TABLES), (train_part, TRAIN_TABLES)):
        for title, cls, _ in tables:
            section = _section(part, title)
            for field in dataclasses.fields(cls):
                if dataclasses.is_dataclass(typing.get_type_hints(cls)[field.name]) or \
                        field.name in NOT_KEYS.get(cls, ()):
                    continue
                assert f"| `{field.name}` |" in section, f"{title} {field.name} missing"
    for method in builtin_methods():
        section = _section(methods_part, method.name)
        for field in dataclasses.fields(method.Params):
            assert f"| `{field.name}` |" in section, f"{method.name} knob {field.name} missing"
        if method.TrainConfig is not None:
            for field in dataclasses.fields(method.TrainConfig):
                assert f"| `{field.name}` |" in _section(train_part, f"[{method.name}]")


def test_official_certainty_is_documented():
    section = _section(config_markdown().split("## Method knobs")[1], "adadiff")
    row = next(line for line in section.splitlines() if line.startswith("| `threshold_kind` |"))
    assert "official-certainty" in row and "1 - u > threshold" in row
