"""Baseline samplers, one module per method (early exit, step skipping, feature caching).

Installed as `adadiff_bench.baselines` (not as a top-level `baselines` package) so that it can
never clash with the unrelated `baselines` distribution on PyPI. Every module here is imported by
the method registry and registers its method with `@register_method`.
"""
