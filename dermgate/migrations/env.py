"""Alembic environment for the dermgate schema.

Runs every migration in one transaction (SQLite and PostgreSQL both have
transactional DDL), so a failed upgrade leaves the previous schema intact.
On PostgreSQL a transaction-scoped advisory lock serialises concurrent
upgrades: several SCP and worker processes may run ``dermgate migrate`` at
start and only the first one does the work. On SQLite the engine's
``BEGIN IMMEDIATE`` does the same.
"""

from __future__ import annotations

import logging.config
import os
from typing import Any

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator

from dermgate.db import Base, make_engine

# pg_advisory_xact_lock key: any constant shared by every dermgate process.
MIGRATION_LOCK_KEY = 0x64676D67  # "dgmg"

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """The URL given programmatically, on the command line, in the environment, or by the settings."""
    url = (config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
           or config.get_main_option("sqlalchemy.url") or os.environ.get("DERMGATE_DATABASE_URL"))
    if url:
        return url
    from dermgate.settings import Settings
    return Settings().db_url


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render our TypeDecorators as their portable implementation type.

    Migration scripts must not import application types: they are frozen
    history, and ``dermgate.db`` will change under them.
    """
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl!r}"
    return False


def configure_options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "render_item": render_item,
        "compare_type": True,
        "render_as_batch": dialect_name == "sqlite",   # SQLite alters tables by copy-and-move
        "transactional_ddl": True,
    }


def run_migrations_offline() -> None:
    """Emit SQL for a DBA to review and apply (``alembic upgrade head --sql``)."""
    url = database_url()
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"},
                      **configure_options(url.split(":", 1)[0].split("+", 1)[0]))
    with context.begin_transaction():
        context.run_migrations()


def run_with_connection(connection: Connection) -> None:
    context.configure(connection=connection, **configure_options(connection.dialect.name))
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    context.run_migrations()


def run_migrations_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        if connection.in_transaction():
            run_with_connection(connection)
        else:
            with connection.begin():
                run_with_connection(connection)
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as conn, conn.begin():
            run_with_connection(conn)
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
