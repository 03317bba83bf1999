"""Sampling methods: a registry of named denoisers (see `registry`)."""
from .registry import Method, NoParams, available_methods, get_method, make_params, register_method

__all__ = ["Method", "NoParams", "available_methods", "get_method", "make_params", "register_method"]
