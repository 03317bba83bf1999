"""docs/extending.md's examples run: every `# file:` block is written out, imported and put through the suite.

The methods pass the conformance check, the trained one trains from the guide's TOML and samples from
its own checkpoint format, the metric and the feature space reach the results and the leaderboard, the
figure reaches index.html, and a plugin that fails to import costs one warning line.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import pandas as pd
import pytest
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from adadiff_bench import checkpoints, plugins
from adadiff_bench.checkpoints import load_checkpoint, load_model
from adadiff_bench.metrics import extractors, specs
from adadiff_bench.methods.registry import _REGISTRY, available_methods
from adadiff_bench.report import registry as figures
from adadiff_bench.testing import check_method_contracts, tiny_backbone
from adadiff_bench.training import load_train_config, train
from conftest import REPO, write_run_config

GUIDE = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"```(?:python|toml)\n# file: (?P<path>\S+)\n(?P<body>.*?)```", re.S)


def guide_files() -> dict[str, str]:
    return {match["path"]: match["body"] for match in BLOCK.finditer(GUIDE.read_text())}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The guide's files in a folder on sys.path, its plugin modules imported (registrations undone after)."""
    folder = tmp_path_factory.mktemp("guide")
    for path, body in guide_files().items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(body)
    (folder / "my_plugin" / "__init__.py").write_text("")
    registries = (_REGISTRY, specs._METRICS, extractors._EXTRACTORS, FEATURE_EXTRACTORS_REGISTRY, figures._FIGURES,
                  checkpoints._FORMATS)
    available_methods()  # the built-in methods loaded first: what is restored afterwards includes them
    saved = [(registry, dict(registry)) for registry in registries]
    sys.path.insert(0, str(folder))
    modules = [f"my_plugin.{name}" for name in ("step_exit", "tail_cache", "calibrated_exit", "density_coverage",
                                                "pixels", "speedup_figure")]
    for module in modules:
        importlib.import_module(module)
    yield folder
    sys.path.remove(str(folder))
    for module in [m for m in sys.modules if m.split(".")[0] == "my_plugin"]:
        del sys.modules[module]
    for registry, content in saved:
        registry.clear()
        registry.update(content)


def test_the_guide_has_every_example():
    assert set(guide_files()) >= {"my_plugin/step_exit.py", "my_plugin/tail_cache.py", "my_plugin/calibrated_exit.py",
                                  "calibrated_exit.toml", "my_plugin/density_coverage.py", "my_plugin/pixels.py",
                                  "my_plugin/speedup_figure.py", "test_my_plugin.py"}


@pytest.mark.parametrize("name, knobs", [("step-exit", {}), ("step-exit", {"strength": 0.9}), ("tail-cache", {}),
                                         ("tail-cache", {"tail": 6, "interval": 3})])
def test_the_example_methods_keep_the_contracts_on_the_digits_model(plugin, name, knobs, monkeypatch):
    monkeypatch.chdir(REPO)
    check_method_contracts(name, load_model(REPO / "checkpoints" / "uvit_digits.pt"), knobs)


def test_the_guides_plugin_test_passes(plugin):
    namespace: dict = {}
    exec(compile((plugin / "test_my_plugin.py").read_text(), "test_my_plugin.py", "exec"), namespace)
    tests = [value for key, value in namespace.items() if key.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()


@pytest.fixture(scope="module")
def trained_table(plugin, tmp_path_factory):
    """The calibrated-exit table, trained from the guide's TOML (fewer steps, paths in a temporary folder)."""
    out = tmp_path_factory.mktemp("calibrated")
    toml = (plugin / "calibrated_exit.toml").read_text().replace("steps = 200", "steps = 60")
    toml = toml.replace('"results/train/calibrated_exit"', f'"{out / "train"}"')
    toml = toml.replace('"calibrated_exit.pt"', f'"{out / "calibrated_exit.pt"}"')
    toml = toml.replace('"checkpoints/uvit_digits.pt"', f'"{REPO / "checkpoints" / "uvit_digits.pt"}"')
    (out / "train.toml").write_text(toml)
    config = load_train_config(out / "train.toml")
    assert config.task == "calibrated-exit"
    train(config, progress=False)
    return out / "calibrated_exit.pt"


def test_the_trained_example_learns_that_the_last_exit_is_the_accurate_one(plugin, trained_table):
    table = load_checkpoint(trained_table, "my-plugin/calibrated-exit")
    error = table.error.detach()
    assert (error[:, -1] < error[:, :-1].min(dim=1).values).all()  # full depth beats every early exit at every t
    assert error[:, -1][0] > error[:, -1][-1]  # and full depth is harder near t = 0 (eps is small there)


def test_the_trained_example_samples_from_its_format(plugin, trained_table, monkeypatch):
    monkeypatch.chdir(REPO)
    check_method_contracts("calibrated-exit", load_model(REPO / "checkpoints" / "uvit_digits.pt"),
                           {"table": str(trained_table), "tau": 1.05})


def test_the_example_metric_space_and_figure_reach_results_and_report(plugin, trained_table, tmp_path, tiny_checkpoint):
    from adadiff_bench.cli import main
    extra = textwrap.dedent(f"""
        [[methods]]
        name = "step-exit"
        strength = [0.3, 0.6]
        [[methods]]
        name = "tail-cache"
        """)
    config = write_run_config(tmp_path, tiny_checkpoint, extra)
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "results" / "tiny" / "results.csv")
    for column in ("density_digits_cnn", "coverage_digits_cnn", "fid_pixels", "density_pixels", "kid_pixels_mean"):
        assert frame[column].notna().all(), column
    assert "is_pixels_mean" not in frame.columns  # pixels provide no logits: no Inception Score in that space
    assert set(frame["method"]) == {"full", "step-exit", "tail-cache"}
    assert main(["report", str(tmp_path / "results" / "tiny"), "--out", str(tmp_path / "report")]) == 0
    board = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "density [digits_cnn] ↑" in board and "coverage [pixels] ↑" in board
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Measured speed-up against layer ratio" in page and (tmp_path / "report" / "speedup_vs_layer_ratio.png").is_file()


def test_the_example_metric_matches_a_brute_force_count(plugin):
    import torch
    density_coverage = importlib.import_module("my_plugin.density_coverage").density_coverage
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 3, generator=generator), torch.randn(30, 3, generator=generator) + 0.3
    space = type("Space", (), {})()
    space.features = type("Features", (), {"layers": {"prc": "f"}, "reference": {"f": real}, "samples": {"f": fake}})()
    space.config = type("Config", (), {"prc_neighborhood": 3})()
    values = density_coverage(space)
    radius = [sorted(float((r - s).norm()) for s in real)[3] for r in real]  # 4th smallest: itself is the first
    inside = [[float((f - r).norm()) <= radius[i] for i, r in enumerate(real)] for f in fake]
    assert values["density"] == pytest.approx(sum(map(sum, inside)) / (3 * len(fake)))
    assert values["coverage"] == pytest.approx(sum(any(row[i] for row in inside) for i in range(len(real))) / len(real))


def test_a_plugin_that_fails_to_import_costs_one_warning_line(monkeypatch, tmp_path):
    broken = EntryPoint("step-exit", "my_missing_plugin.step_exit", "adadiff_bench.methods")
    monkeypatch.setattr(plugins, "entry_points", lambda group: [broken] if group == "adadiff_bench.methods" else [])
    monkeypatch.setattr(plugins, "_loaded", {})
    with pytest.warns(UserWarning, match=r"plugin 'step-exit' \(my_missing_plugin.step_exit, group "
                                         r"adadiff_bench.methods\) failed to import and is skipped"):
        assert plugins.load_plugins("adadiff_bench.methods") == []


def test_the_cli_survives_a_broken_plugin_and_says_so_on_one_line(tmp_path):
    """A real installed entry point that fails: other commands still work, with one warning line."""
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[adadiff_bench.methods]\nbroken = broken_plugin_module\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "adadiff_bench", "methods"], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert out.returncode == 0 and "static-exit" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "plugin 'broken' (broken_plugin_module" in warnings[0], out.stderr
