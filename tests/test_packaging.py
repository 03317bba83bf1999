"""Packaging: the suite never installs a top-level `baselines` (PyPI has an unrelated package of that name)."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO


def is_installed() -> bool:
    """True when `adadiff_bench` is imported from an installation, not from this source tree."""
    import adadiff_bench
    return Path(adadiff_bench.__file__).resolve().parent != REPO / "adadiff_bench"


def installed_files() -> list[str]:
    if not is_installed():
        pytest.skip("adadiff-bench is not installed (run the tests through tox)")
    return [str(f) for f in importlib.metadata.files("adadiff-bench") or []]


def test_baselines_install_under_the_suites_namespace():
    files = installed_files()
    assert not [f for f in files if f.startswith("baselines/")]
    assert any(f.startswith("adadiff_bench/baselines/") for f in files)
    assert any(f.endswith("adadiff_bench/assets/digits_cnn.pt") for f in files)


def test_a_foreign_baselines_package_does_not_shadow_ours(tmp_path):
    foreign = tmp_path / "baselines"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise ImportError('this is the unrelated PyPI baselines package')\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from adadiff_bench.methods import available_methods
        assert "full" in available_methods()
        import adadiff_bench.baselines
        print("ok")
    """)
    # a source checkout run from its root, and the installed package run from elsewhere
    for cwd in [REPO] + ([tmp_path] if is_installed() else []):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_console_entry_point_is_declared():
    try:
        scripts = importlib.metadata.entry_points(group="console_scripts")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("not installed")
    names = {ep.name: ep.value for ep in scripts}
    if "adadiff-bench" not in names:
        pytest.skip("adadiff-bench is not installed (run the tests through tox)")
    assert names["adadiff-bench"] == "adadiff_bench.cli:main"
