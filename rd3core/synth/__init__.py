"""Synthesis methods: one module each, registered by name.

A method is a :class:`Method`: a frozen params dataclass (which always has
``ipc``), a code ``version`` that enters its cache key, and ``run`` that turns
the real dataset (and the frozen teacher, when it needs one) into a
:class:`DistilledSet`. Every random draw comes from ``seed``. Two optional
hooks: ``key_inputs`` (what the cache key hashes: only what the output depends
on) and ``check`` (dataset- or teacher-dependent problems, reported when a
study is validated). Algorithms, parameters and sources: docs/METHODS.md.
"""
from .base import (METHODS, Check, DistilledSet, KeyInputs, Method, default_key_inputs, list_methods,
                   register_method, store_images, synthesize, unseeded_key_inputs)
from . import cda, external, full_real, herding, random_real, rded, sre2l  # noqa: F401  (registers the methods)

__all__ = ["METHODS", "Check", "DistilledSet", "KeyInputs", "Method", "default_key_inputs", "list_methods",
           "register_method", "store_images", "synthesize", "unseeded_key_inputs"]
