"""Core fixtures: every database test runs on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from dermgate.db import Base, create_schema, make_engine, make_sessionmaker
from dermgate.store import ObjectStore
from tests.peers.audit import ListAudit



@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    engine = make_engine(base)
    Base.metadata.drop_all(engine)
    engine.dispose()
    yield base


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker]:
    engine = make_engine(db_url)
    create_schema(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "store")


@pytest.fixture
def audit() -> ListAudit:
    return ListAudit()
