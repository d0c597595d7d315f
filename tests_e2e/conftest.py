"""Fixtures for the browser tests: the same real engine, settings, store and manager as `make test`."""

from __future__ import annotations

from tests.conftest import engine, manager, settings, store  # noqa: F401  (pytest finds fixtures by name)
