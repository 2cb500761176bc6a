"""Versioned migrations (dermgate/migrations) on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect

from dermgate import migrate
from dermgate.db import Base, create_schema, make_engine

ROOT = Path(__file__).resolve().parents[2]


def schema_of(url: str) -> dict[str, dict[str, object]]:
    """Tables -> columns (name, nullable), index and unique column sets, foreign keys, as the database reports them."""
    engine = make_engine(url)
    try:
        insp = inspect(engine)
        out: dict[str, dict[str, object]] = {}
        for table in insp.get_table_names():
            if table == migrate.VERSION_TABLE:
                continue
            out[table] = {
                "columns": {(c["name"], bool(c["nullable"])) for c in insp.get_columns(table)},
                "indexes": {(tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)},
                "unique": {tuple(u["column_names"]) for u in insp.get_unique_constraints(table)},
                "fks": {(tuple(f["constrained_columns"]), f["referred_table"]) for f in insp.get_foreign_keys(table)},
            }
        return out
    finally:
        engine.dispose()


def metadata_schema() -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for name, table in Base.metadata.tables.items():
        out[name] = {
            "columns": {(c.name, bool(c.nullable)) for c in table.columns},
            "indexes": {(tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes},
            "unique": {tuple(c.name for c in u.columns) for u in table.constraints
                       if u.__class__.__name__ == "UniqueConstraint"},
            "fks": {(tuple(fk.parent.name for fk in c.elements), c.elements[0].column.table.name)
                    for c in table.foreign_key_constraints},
        }
    return out


def comparable(schema: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Unique constraints and unique indexes are the same thing to a dialect; compare them as one set."""
    out = {}
    for table, parts in schema.items():
        unique = set(parts["unique"]) | {cols for cols, uniq in parts["indexes"] if uniq}  # type: ignore[union-attr]
        out[table] = {"columns": parts["columns"], "unique": unique, "fks": parts["fks"],
                      "indexes": {cols for cols, uniq in parts["indexes"] if not uniq}}  # type: ignore[union-attr]
    return out


def test_upgrade_head_creates_exactly_the_schema_of_the_models(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert comparable(schema_of(database_url)) == comparable(metadata_schema())
    assert migrate.schema_diff(database_url) == []
    command.check(migrate.alembic_config(database_url))   # `alembic check`: raises when a migration is missing
    assert migrate.current(database_url) == migrate.head()


def test_upgrade_twice_changes_nothing(database_url: str) -> None:
    migrate.upgrade(database_url)
    before = schema_of(database_url)
    migrate.upgrade(database_url)
    assert schema_of(database_url) == before
    assert migrate.current(database_url) == migrate.head()


def test_concurrent_upgrades_from_several_processes_serialise(database_url: str) -> None:
    """SCP and worker processes may all run `dermgate migrate` at start; one migrates, the others find head."""
    code = "import sys; from dermgate.migrate import upgrade; upgrade(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert migrate.current(database_url) == migrate.head()
    assert migrate.schema_diff(database_url) == []


def test_downgrade_to_base_drops_everything_and_upgrade_restores_it(database_url: str) -> None:
    migrate.upgrade(database_url)
    migrate.downgrade(database_url, "base")
    assert schema_of(database_url) == {}
    assert migrate.current(database_url) is None
    migrate.upgrade(database_url)
    assert migrate.schema_diff(database_url) == []


def test_database_made_by_create_all_is_adopted_at_head(database_url: str) -> None:
    """Work dirs created before migrations existed keep working: same schema, so stamped, not recreated."""
    engine = make_engine(database_url)
    create_schema(engine)
    engine.dispose()
    migrate.upgrade(database_url)
    assert migrate.current(database_url) == migrate.head()
    assert migrate.schema_diff(database_url) == []


def test_unversioned_database_with_a_different_schema_is_refused(database_url: str) -> None:
    engine = make_engine(database_url)
    Table("jobs", MetaData(), Column("id", Integer, primary_key=True), Column("other", String(8))).create(engine)
    engine.dispose()
    with pytest.raises(migrate.UnversionedSchemaError):
        migrate.upgrade(database_url)
    assert migrate.current(database_url) is None


def test_migrations_are_found_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripts are located beside the package, as in an installed wheel, not relative to the cwd."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()


def test_history_is_one_linear_chain() -> None:
    """One head and no branches: every release upgrades along the same path."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    assert len(scripts.get_heads()) == 1
    revisions = list(scripts.walk_revisions())
    assert revisions[-1].down_revision is None
    assert all(not r.is_merge_point and not r.is_branch_point for r in revisions)


def test_offline_mode_emits_postgresql_ddl_for_a_dba() -> None:
    """`alembic upgrade head --sql`: the DDL can be reviewed and applied by a DBA without a connection."""
    import io
    buf = io.StringIO()
    cfg = migrate.alembic_config("postgresql+psycopg2://nobody@127.0.0.1:9/none")
    cfg.output_buffer = buf
    command.upgrade(cfg, "head", sql=True)
    sql = buf.getvalue()
    for table in Base.metadata.tables:
        assert f"CREATE TABLE {table} (" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert f"INSERT INTO {migrate.VERSION_TABLE}" in sql


def test_alembic_command_line_uses_the_shipped_ini(tmp_path: Path) -> None:
    """Developers run `alembic -c dermgate/alembic.ini ...` with the URL in DERMGATE_DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DERMGATE_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ROOT / "dermgate" / "alembic.ini"),
                           "upgrade", "head"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert migrate.current(url) == migrate.head()


@pytest.mark.postgres
def test_postgres_peer_listens_on_loopback_only(postgres_database: str) -> None:
    from sqlalchemy import text
    engine = make_engine(postgres_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
            assert int(conn.execute(text("SHOW server_version_num")).scalar()) >= 150000
            assert inspect(conn).get_table_names() == []          # each test gets an empty database
    finally:
        engine.dispose()
