"""Composition root: builds the service's parts from one Settings object.

Everything is constructed here and injected downwards, so tests build the
same parts with their own settings, peers and clocks.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.orm import sessionmaker

from audit.api import AuditSink
from dermgate.db import create_schema, make_engine, make_sessionmaker
from dermgate.pipeline import Dispatcher, Planner, Worker
from dermgate.records import Channel
from dermgate.settings import Settings
from dermgate.store import ObjectStore

log = structlog.get_logger("dermgate.app")


class Runtime:
    """The parts of a running dermgate, built lazily from settings."""

    def __init__(self, settings: Settings, *, create: bool = True) -> None:
        self.settings = settings
        settings.workdir.mkdir(parents=True, exist_ok=True)
        self.db: DbEngine = make_engine(settings.db_url)
        if create:
            if self.db.dialect.name == "sqlite":
                create_schema(self.db)
            else:
                from dermgate.migrate import upgrade
                upgrade(settings.db_url)
        self.sessions: sessionmaker = make_sessionmaker(self.db)
        self.store = ObjectStore(settings.store_dir)

    @cached_property
    def audit(self) -> AuditSink:
        from audit.setup import open_from_settings
        return open_from_settings(self.settings)

    @cached_property
    def classifier(self) -> Any:
        from inference.engine import Engine
        m = self.settings.model
        threads = m.threads or max(1, (os.cpu_count() or 2))
        return Engine(m.path, intra_op_threads=threads)

    @cached_property
    def channels(self) -> dict[str, Channel]:
        from dermgate.channels import build_channels
        return build_channels(self)

    @cached_property
    def planners(self) -> list[Planner]:
        from dermgate.channels import build_planners
        return build_planners(self)

    def worker(self, owner: str | None = None) -> Worker:
        return Worker(self.sessions, self.store, self.classifier, self.audit, self.planners,
                      self.settings.worker, owner=owner)

    def dispatcher(self, owner: str | None = None) -> Dispatcher:
        return Dispatcher(self.sessions, self.channels, self.settings.worker, self.audit, owner=owner)

    def intake(self) -> Any:
        from dermgate.intake import Intake
        return Intake(self.store, self.sessions)

    def close(self) -> None:
        closer = getattr(self.__dict__.get("audit"), "close", None)
        if closer:
            closer()
        self.db.dispose()


def workdir_from(path: str | Path | None) -> Path:
    return Path(path or os.environ.get("DERMGATE_WORKDIR") or Path.cwd()).resolve()
