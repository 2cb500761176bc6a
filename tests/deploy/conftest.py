"""Deploy and migration tests use the real PostgreSQL peer (tests/peers/postgres.py)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # A no-op when the top-level conftest already lists it in pytest_plugins.
    config.pluginmanager.import_plugin("tests.peers.postgres")
