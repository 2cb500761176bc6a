"""Top-level test configuration: real-peer fixtures shared by every test area."""

import os
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.peers.orthanc", "tests.peers.postgres", "tests.integration.fhir.peer", "tests.peers.oidc"]


@pytest.fixture(autouse=True)
def _environment_stays_as_found() -> Iterator[None]:
    """A command run in-process (the demo, the CLI) sets DERMGATE_WORKDIR for its own subprocesses;
    it must not leak into the next test's commands, which would then act on another work dir."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)
