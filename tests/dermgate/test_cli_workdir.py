"""A mistyped work dir creates nothing, and commands that only read never migrate."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from dermgate.db import make_engine
from dermgate.migrate import current, downgrade, head
from tests.dermgate.test_cli import dermgate


@pytest.mark.parametrize("command", [["jobs", "list"], ["outbox", "list"], ["jobs", "retry"], ["audit", "verify"],
                                     ["api-token", "list"], ["review", "1.2.3", "--reviewer", "x", "--confirm"]])
def test_a_work_dir_without_dermgate_state_is_refused_and_left_untouched(tmp_path: Path, command: list[str]) -> None:
    typo = tmp_path / "dermgate-wrok"
    run = dermgate(*command, "--workdir", str(typo), cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "holds no dermgate state" in run.stderr and "--workdir" in run.stderr
    assert not typo.exists(), sorted(p.name for p in typo.rglob("*"))


def test_migrate_creates_a_work_dir_and_then_read_only_commands_accept_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert dermgate("migrate", "--workdir", str(work), cwd=tmp_path).returncode == 0
    assert current(f"sqlite:///{work / 'dermgate.db'}") == head()
    jobs = dermgate("jobs", "list", "--workdir", str(work), cwd=tmp_path)
    assert jobs.returncode == 0, jobs.stderr
    assert jobs.stdout.startswith("id")


def test_read_only_commands_do_not_migrate_the_database(tmp_path: Path) -> None:
    work = tmp_path / "work"
    url = f"sqlite:///{work / 'dermgate.db'}"
    assert dermgate("migrate", "--workdir", str(work), cwd=tmp_path).returncode == 0
    downgrade(url, "base")                      # as a database from an older release would be
    run = dermgate("jobs", "list", "--workdir", str(work), cwd=tmp_path)
    assert run.returncode == 2 and "dermgate migrate" in run.stderr, run.stdout + run.stderr
    assert current(url) is None
    engine = make_engine(url)
    assert "jobs" not in inspect(engine).get_table_names()
    engine.dispose()
