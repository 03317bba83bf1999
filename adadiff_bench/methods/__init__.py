"""Sampling methods: a registry of named denoisers (see `registry`), and the bases methods build on.

`PrefixExit` (`prefix_exit`) is the base of methods that exit after a prefix of the blocks;
`BlockCaching` (`block_cache`) of methods that reuse cached block outputs on some steps.
"""
from .registry import (Method, NoParams, PrepareContext, available_methods, get_method, make_params,
                       register_method, trainable_methods)

__all__ = ["Method", "NoParams", "PrepareContext", "available_methods", "get_method", "make_params",
           "register_method", "trainable_methods"]
