"""A real PostgreSQL server for tests: ``initdb`` in a temporary folder, ``pg_ctl`` on loopback.

Fixtures (register with ``pytest_plugins = ["tests.peers.postgres"]``):

- ``postgres_url`` (session): the URL (``postgresql+psycopg2://...``) of the
  server's ``postgres`` database; the server is started once per session and
  stopped at its end. ``DERMGATE_TEST_PG_URL`` names an already running server
  instead (its role needs CREATEDB for ``postgres_database``).
- ``postgres_database`` (function): a new, empty database on that server,
  dropped after the test.
- ``database_url`` (function, parametrised ``sqlite`` / ``postgresql``): a new,
  empty database on each backend, for tests that must hold on both.

When no PostgreSQL binaries exist the PostgreSQL cases are skipped, except
under CI (``CI=true``), where that is a failure: CI must test both backends.

initdb refuses to run as root (CI runs as root), so the cluster is created and
run as an unprivileged user (``postgres``, else ``nobody``) through
``runuser``. Durability settings are off (fsync, synchronous_commit): tests
check behaviour, not crash safety of PostgreSQL itself.

Usable outside pytest too (the bench scripts)::

    python -m tests.peers.postgres start DIR   # prints the URL, leaves it running
    python -m tests.peers.postgres stop DIR
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_URL_ENV = "DERMGATE_TEST_PG_URL"
PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/local/bin")
UNPRIVILEGED_USERS = ("postgres", "nobody")
SUPERUSER = "dermgate"
START_TIMEOUT_S = 60
START_TRIES = 3
SERVER_OPTIONS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                  "-c max_connections=200 -c shared_buffers=64MB")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries, or the server would not start."""


def find_bin_dir() -> Path | None:
    """The folder with initdb and pg_ctl: Debian's PostgreSQL 15 first, then any other version, then PATH."""
    versioned = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for candidate in (*PG_BIN_CANDIDATES[:1], *versioned, *PG_BIN_CANDIDATES[1:]):
        d = Path(candidate)
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found and shutil.which("initdb") else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_as_user() -> str | None:
    """The user to run PostgreSQL as: None to run as ourselves, else an unprivileged account (we are root)."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresUnavailable("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")


@dataclass
class PostgresServer:
    """One throwaway cluster under ``base_dir`` (``data/``, ``server.log``, the socket)."""
    bin_dir: Path
    base_dir: Path
    port: int = 0
    user: str | None = None

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd=self.base_dir)

    def init(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.base_dir, pw.pw_uid, pw.pw_gid)
        self.base_dir.chmod(0o700)
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
                      "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        except subprocess.CalledProcessError as exc:
            raise PostgresUnavailable(f"initdb failed: {exc.stderr.strip()}") from exc

    def start(self) -> None:
        """Start on a free loopback port; retries with another port if one was taken meanwhile."""
        last = ""
        for _ in range(START_TRIES):
            self.port = free_port()
            opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base_dir} {SERVER_OPTIONS}"
            proc = self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data_dir),
                             "-l", str(self.log_file), "-o", opts, check=False)
            if proc.returncode == 0:
                return
            last = proc.stderr.strip() + "\n" + self._log_tail()
        raise PostgresUnavailable(f"pg_ctl start failed: {last}")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", check=False)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-2000:]
        return ""


def start_server(base_dir: Path) -> PostgresServer:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable("PostgreSQL binaries not found (Debian: apt-get install postgresql-15)")
    server = PostgresServer(bin_dir=bin_dir, base_dir=base_dir, user=run_as_user())
    server.init()
    server.start()
    return server


def create_database(server_url: str, prefix: str = "dermgate_test") -> str:
    """Create an empty database on the server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    finally:
        engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(db_url: str) -> None:
    """Drop the database, disconnecting whoever is left (a leaked pool must not fail the next test)."""
    url = make_url(db_url)
    engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    finally:
        engine.dispose()


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a running PostgreSQL server (started here, or named by DERMGATE_TEST_PG_URL)."""
    external = os.environ.get(PG_URL_ENV)
    if external:
        yield external
        return
    base = Path(tempfile.mkdtemp(prefix="dermgate-pg-"))
    base.chmod(0o711)   # the unprivileged server user must reach its cluster folder inside
    server: PostgresServer | None = None
    try:
        try:
            server = start_server(base / "cluster")
        except PostgresUnavailable as exc:
            _unavailable(str(exc))
        assert server is not None
        yield server.url
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    url = create_database(postgres_url)
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a new, empty database on each backend the service supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dermgate.db'}"
        return
    yield request.getfixturevalue("postgres_database")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print("usage: python -m tests.peers.postgres start|stop DIR", file=sys.stderr)
        return 2
    base = Path(argv[2]).resolve()
    if argv[1] == "start":
        print(start_server(base).url)
        return 0
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return 1
    PostgresServer(bin_dir=bin_dir, base_dir=base, user=run_as_user()).stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
