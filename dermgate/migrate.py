"""Versioned schema migrations (Alembic), run by the service itself.

``upgrade(url)`` brings any database to the schema of this release; it is what
``dermgate migrate`` runs, and it is safe to run from several processes at
once (see ``migrations/env.py``). The scripts are found beside this module, so
an installed wheel migrates without the source tree or a working directory.

A database made before migrations existed (``create_all``) is adopted: when
its tables match this release's schema exactly it is stamped at head; when
they differ, nobody can say which revision it is at and the upgrade refuses.

Exceptions::

    MigrationError
    └── UnversionedSchemaError   tables exist, no version recorded, schema differs
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from dermgate.db import Base, make_engine

PACKAGE_DIR = Path(__file__).resolve().parent
SCRIPT_LOCATION = PACKAGE_DIR / "migrations"
VERSION_TABLE = "alembic_version"


class MigrationError(Exception):
    """The schema cannot be brought to this release's version."""


class UnversionedSchemaError(MigrationError):
    """Tables exist without a recorded version and differ from this release's schema."""


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged scripts, bound to ``url`` or an open ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if url is not None:
        cfg.attributes["url"] = url
    if connection is not None:
        cfg.attributes["connection"] = connection
    cfg.attributes["configure_logger"] = False
    return cfg


def head() -> str:
    """The newest revision shipped with this release."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:
        raise MigrationError("no migration scripts found")
    return revision


def current(url: str) -> str | None:
    """The revision the database is at, or None when unversioned."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def schema_diff(url: str) -> list[Any]:
    """Differences between the database and ``dermgate.db``'s metadata (empty when in step)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return [d for d in compare_metadata(context, Base.metadata) if not _is_version_table(d)]
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` (default: this release's head)."""
    _adopt_unversioned(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate down to ``revision`` (``"base"`` drops every table): for rollbacks and tests."""
    command.downgrade(alembic_config(url), revision)


def _adopt_unversioned(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    ours = set(Base.metadata.tables)
    if VERSION_TABLE in tables or not tables & ours:
        return
    diff = schema_diff(url)
    if diff:
        raise UnversionedSchemaError(
            f"database has dermgate tables but no {VERSION_TABLE} and differs from this release: {diff[:5]}")
    command.stamp(alembic_config(url), "head")


def _is_version_table(diff: Any) -> bool:
    return isinstance(diff, tuple) and len(diff) > 1 and getattr(diff[1], "name", None) == VERSION_TABLE
