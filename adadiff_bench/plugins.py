"""Plugins: other packages extend the suite through entry-point groups, each entry a module or object to load.

    adadiff_bench.methods   a module that registers methods on import (or a `Method` subclass)
    adadiff_bench.metrics   a module that registers metrics or feature extractors on import
    adadiff_bench.figures   a module that registers report figures on import

A plugin that fails to import never breaks a command: it is skipped with one warning line that names
the plugin and its error. This module imports nothing heavy (the report loads figure plugins).
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points

GROUPS = ("adadiff_bench.methods", "adadiff_bench.metrics", "adadiff_bench.figures")
_loaded: dict[str, list] = {}


def load_plugins(group: str) -> list:
    """Load every entry point of `group` once; returns the loaded objects (failed plugins left out, with a warning)."""
    if group not in _loaded:
        _loaded[group] = []
        for entry in entry_points(group=group):
            try:
                _loaded[group].append(entry.load())
            except Exception as exc:  # a broken plugin must not break the command: name it and go on
                warnings.warn(f"plugin {entry.name!r} ({entry.value}, group {group}) failed to import and is "
                              f"skipped: {type(exc).__name__}: {exc}", stacklevel=2)
    return _loaded[group]
