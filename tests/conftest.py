"""Shared pytest configuration for the slimta_tx test suite."""

from __future__ import annotations

from hypothesis import settings

# Property tests must not fail on a slow or busy machine: no per-example deadline.
settings.register_profile("slimta_tx", deadline=None)
settings.load_profile("slimta_tx")
