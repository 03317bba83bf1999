"""Knob metadata agrees with the checks: every declared range, bound and choice is held against `validate`.

For every built-in method's `Params` and `TrainConfig`, and every run/training config table documented
in `docs_config`: a value just outside a declared bound is refused, the bound itself (or the nearest
value inside an open bound) is accepted, every declared choice is accepted and a bogus one refused.
Each value goes through the loader a TOML file goes through (`make_params` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from adadiff_bench.cli import main
from adadiff_bench.config import SamplingConfig, UViTConfig, from_dict
from adadiff_bench.docs_config import RUN_TABLES, TRAIN_TABLES, builtin_methods, method_text
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import Bounds, KnobInfo, bounds, knob, knob_info, knob_rows
from adadiff_bench.methods import make_params, trainable_methods

# values for the knobs that another knob `needs` (e.g. AdaDiff's overrides need a training config)
NEEDED = {"train": "configs/adadiff_digits_frozen.toml"}
# other keys a value needs to be accepted, where a check ties two keys: {(table, key): {value or "*": keys}}
CONTEXT = {
    ("DataConfig", "name"): {"folder": {"path": "images/"}, "npz": {"path": "images.npz"}},
    ("UViTConfig", "img_size"): {"*": {"patch_size": 1}},
    ("DiTConfig", "sample_size"): {"*": {"patch_size": 1}},
    ("UViTConfig", "embed_dim"): {"*": {"num_heads": 1}},
    ("SamplingConfig", "solver"): {"euler-maruyama": {"schedule": "vp"}, "dpm-solver-fast": {"schedule": "vp"}},
    ("SamplingConfig", "schedule"): {"vp": {"solver": "euler-maruyama"}},
}


def _tables():
    """(id, dataclass, key -> KnobInfo, loader) for every documented table."""
    for method in builtin_methods():
        tables = [("Params", method.Params, lambda raw, m=method: make_params(m, raw, "test"))]
        if method.TrainConfig is not None:
            tables.append(("TrainConfig", method.TrainConfig,
                           lambda raw, m=method: from_dict(m.TrainConfig, raw, f"test [{m.name}]")))
        for label, cls, load in tables:
            infos = {f.name: knob_info(f) for f in dataclasses.fields(cls)}
            yield f"{method.name}.{label}", cls, infos, load
    for title, cls, described in RUN_TABLES + TRAIN_TABLES:
        if cls.__name__ in ("RunConfig", "MethodEntry"):  # top-level keys need a whole run config; checked below
            continue
        yield f"{title}:{cls.__name__}", cls, described, lambda raw, c=cls: from_dict(c, raw, "test")


TABLES = list(_tables())


def _is_int(cls, key) -> bool:
    return typing.get_type_hints(cls)[key] in (int, list[int], int | None)


def _is_list(cls, key) -> bool:
    return typing.get_origin(typing.get_type_hints(cls)[key]) is list


def edge_values(interval: Bounds, integer: bool) -> list[float]:
    """Per declared bound: the nearest value outside it and the bound itself; for an open bound, the bound and
    the nearest value inside it."""
    def step(value, toward):
        return value + (1 if toward > 0 else -1) if integer else math.nextafter(float(value), toward * math.inf)
    values = []
    for bound, is_open, inward in ((interval.low, interval.low_open, 1), (interval.high, interval.high_open, -1)):
        if bound is not None:
            bound = int(bound) if integer else float(bound)
            values += [bound, step(bound, inward)] if is_open else [step(bound, -inward), bound]
    return values


def accepts(load, cls, key, value, extra: dict) -> bool:
    raw = {**extra, key: [value] if _is_list(cls, key) and not isinstance(value, list) else value}
    for other, values in CONTEXT.get((cls.__name__, key), {}).items():
        if other in ("*", value):
            raw = {**values, **raw}
    try:
        load(raw)
    except UserError:
        return False
    return True


def _needed(info: KnobInfo) -> dict:
    return {name: NEEDED[name] for name in info.needs}


@pytest.mark.parametrize("table_id, cls, infos, load", TABLES, ids=[t[0] for t in TABLES])
def test_declared_bounds_agree_with_validate(table_id, cls, infos, load):
    checked = 0
    for key, info in infos.items():
        if info is None:
            continue
        cases = [(info.bounds, {})] if info.bounds is not None else []
        if info.bounds_by is not None:
            other, by_value = info.bounds_by
            cases += [(interval, {other: value}) for value, interval in by_value.items()]
        for interval, extra in cases:
            for value in edge_values(interval, _is_int(cls, key)):
                accepted = accepts(load, cls, key, value, {**extra, **_needed(info)})
                assert accepted == interval.contains(value), \
                    f"{table_id}.{key} = {value!r}: declared {interval} but validate {'accepts' if accepted else 'refuses'} it"
                checked += 1
    if any(info is not None and (info.bounds or info.bounds_by) for info in infos.values()):
        assert checked > 0


@pytest.mark.parametrize("table_id, cls, infos, load", TABLES, ids=[t[0] for t in TABLES])
def test_declared_choices_agree_with_validate(table_id, cls, infos, load):
    for key, info in infos.items():
        if info is None or not info.choice_list():
            continue
        for choice in info.choice_list():
            assert accepts(load, cls, key, choice, _needed(info)), f"{table_id}.{key}: declared choice {choice!r} refused"
        assert not accepts(load, cls, key, "no-such-choice", _needed(info)), \
            f"{table_id}.{key}: a choice outside {info.choice_list()} was accepted"


@pytest.mark.parametrize("table_id, cls, infos, load", TABLES, ids=[t[0] for t in TABLES])
def test_every_key_has_a_meaning(table_id, cls, infos, load):
    keys = [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
    undocumented = [k for k in keys if infos.get(k) is None or not infos[k].meaning]
    assert not undocumented, (f"{table_id}: no meaning for {undocumented}; declare them with knobs.knob (method "
                              "tables) or describe them in adadiff_bench/docs_config.py (config tables)")


def test_the_top_level_run_keys_agree_with_validate(tmp_path):
    from adadiff_bench.config import PRECISIONS, load_run_config
    from adadiff_bench.docs_config import _RUN
    assert _RUN["precision"].choice_list() == PRECISIONS
    for precision in PRECISIONS:
        path = tmp_path / "run.toml"
        path.write_text(f'precision = "{precision}"\n[[methods]]\nname = "full"\n')
        assert load_run_config(path).precision == precision
    path.write_text('precision = "fp64"\n[[methods]]\nname = "full"\n')
    with pytest.raises(UserError):
        load_run_config(path)


def test_the_check_itself_catches_a_wrong_declaration():
    """A declared range wider than validate's, or a choice validate refuses, is caught by the helpers above."""
    @dataclasses.dataclass
    class Wrong:
        ratio: float = knob(0.5, "a ratio", at_least=0, at_most=2)   # validate allows only [0, 1]
        mode: str = knob("a", "a mode", choices=("a", "b", "c"))      # validate refuses "c"

        def validate(self, where):
            if not 0 <= self.ratio <= 1 or self.mode not in ("a", "b"):
                raise UserError(where)

    def load(raw):
        return from_dict(Wrong, raw, "test")
    info = knob_info(dataclasses.fields(Wrong)[0])
    assert any(accepts(load, Wrong, "ratio", v, {}) != info.bounds.contains(v) for v in edge_values(info.bounds, False))
    assert not accepts(load, Wrong, "mode", "c", {})


def test_bounds_text_and_membership():
    assert str(bounds(above=0, at_most=1)) == "(0, 1]" and str(bounds(at_least=1)) == ">= 1"
    assert str(bounds(at_least=0, below=1)) == "[0, 1)" and str(bounds(below=3)) == "< 3"
    interval = bounds(above=0, at_most=1)
    assert [interval.contains(v) for v in (0, 1e-300, 1, 1.0000001)] == [False, True, True, False]
    assert bounds() is None
    with pytest.raises(ValueError):
        bounds(at_least=0, above=0)


def test_knob_keeps_the_default_and_copies_a_mutable_one():
    @dataclasses.dataclass
    class Table:
        values: list[float] = knob([1.0, 2.0], "some values", at_least=0)
        name: str = knob("x", "a name", choices=("x", "y"))
    first, second = Table(), Table()
    first.values.append(3.0)
    assert second.values == [1.0, 2.0] and second.name == "x"
    rows = knob_rows(Table)
    assert [(r.name, r.type, r.default, r.valid) for r in rows] == [
        ("values", "list of float", "[1.0, 2.0]", ">= 0"), ("name", "str", '"x"', "x | y")]


# ---- the CLI ---------------------------------------------------------------------------------

def test_methods_name_prints_every_knob_with_type_default_range_and_meaning(capsys):
    from adadiff_bench.methods import get_method
    for method in builtin_methods():
        assert main(["methods", method.name]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{method.name}  (family: {method.family}")
        rows = knob_rows(method.Params) + (knob_rows(method.TrainConfig) if method.TrainConfig else [])
        for row in rows:
            line = f"  {row.name}: {row.type} = {row.default}" + (f"   valid: {row.valid}" if row.valid else "")
            assert line in out.splitlines(), f"{method.name}: missing {line!r}"
            assert " ".join(row.meaning.split()[:4]) in " ".join(out.split())
    text = method_text(get_method("adadiff"))
    assert 'threshold_kind: str = "uncertainty"   valid: uncertainty | official-certainty' in text
    assert "arXiv 2309.17074" in text and "training table [adadiff]" in text


def test_methods_name_cites_the_paper_from_the_docstring(capsys):
    main(["methods", "deepcache"])
    assert "DeepCache: Accelerating Diffusion Models for Free" in " ".join(capsys.readouterr().out.split())
    main(["methods", "l2c"])
    assert "NeurIPS 2024 (arXiv 2406.01733)" in " ".join(capsys.readouterr().out.split())


def test_methods_alone_lists_every_method(capsys):
    from adadiff_bench.methods import available_methods
    assert main(["methods"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == available_methods()


def test_methods_with_an_unknown_name_suggests_the_close_one(capsys):
    assert main(["methods", "adadif"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "unknown method 'adadif'" in captured.err
    assert "did you mean 'adadiff'" in captured.err


def test_train_help_names_every_task_table_and_points_to_methods(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    builtin = {m.name for m in builtin_methods()}
    for name in trainable_methods():
        if name in builtin:
            assert f"[{name}]" in out, f"train --help does not name the [{name}] table"
    assert "adadiff-bench methods NAME" in out and "docs/config.md" in out


def test_a_plugin_without_knob_metadata_still_prints(capsys):
    from adadiff_bench.methods import Method
    from adadiff_bench.methods.registry import _REGISTRY, register_method

    @dataclasses.dataclass
    class PlainParams:
        speed: float = 1.0

    class Plain(Method):
        """A plugin's method without knob metadata."""
        name = "plain-plugin-test"
        Params = PlainParams
    register_method(Plain)
    try:
        assert main(["methods", "plain-plugin-test"]) == 0
        assert "  speed: float = 1.0" in capsys.readouterr().out.splitlines()
    finally:
        del _REGISTRY["plain-plugin-test"]


def test_the_contexts_above_are_real_constraints():
    """Without its CONTEXT entry each value is refused: the entries are needed, not leftovers."""
    for raw in ({"img_size": 1}, {"embed_dim": 1}):
        with pytest.raises(UserError):
            from_dict(UViTConfig, raw, "test")
    for raw in ({"solver": "euler-maruyama"}, {"schedule": "vp"}):
        with pytest.raises(UserError):
            from_dict(SamplingConfig, raw, "test")
