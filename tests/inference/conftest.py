"""Fixtures for the inference tests: the committed model and the committed sample images."""

from __future__ import annotations

import pytest

from inference.engine import Engine
from tests.inference.sampledata import Sample, load_samples


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The model committed in the ``models`` package, loaded as the service loads it (CPU, 2 threads)."""
    return Engine(intra_op_threads=2)


@pytest.fixture(scope="session")
def samples() -> list[Sample]:
    return load_samples()
