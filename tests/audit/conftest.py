"""Fixtures for the audit tests: fresh keys and a trail in a temporary directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from audit.keys import Keyring, Signer
from audit.trail import AuditTrail


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate("k1")


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def make_trail(audit_dir: Path, keyring: Keyring, signer: Signer) -> Iterator[Callable[..., AuditTrail]]:
    opened: list[AuditTrail] = []

    def factory(**kwargs: object) -> AuditTrail:
        kwargs.setdefault("checkpoint_seconds", None)
        directory = kwargs.pop("directory", audit_dir)
        trail = AuditTrail(directory, kwargs.pop("keys", keyring), kwargs.pop("signer", signer), **kwargs)  # type: ignore[arg-type]
        opened.append(trail)
        return trail

    yield factory
    for trail in opened:
        trail.close()
