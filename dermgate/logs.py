"""Structured JSON application logs (structlog), with no PHI.

Application logs carry UIDs only where needed and never patient names, ids or
birth dates; the redaction processor below is defence in depth, the rule is
not to pass PHI to a logger at all. PHI lives in the database and the
encrypted audit trail only.

Every line goes through the same processors, whoever wrote it: dermgate's own
structlog events, records of other libraries' stdlib loggers (highdicom,
pydicom, Alembic, SQLAlchemy, uvicorn) and ``warnings`` (captured into
logging). They are all rendered as JSON by one ``ProcessorFormatter`` whose
chain redacts PHI by key and by value (``audit.phi``), so a library that puts
a raw DICOM value in its message cannot bypass it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

from audit.phi import redact_phi
from dermgate.durable import private_dir, private_file

LOG_FILE_MODE = 0o600            # logs name UIDs and hosts: owner only, whatever the umask
LOG_DIR_MODE = 0o700


def _processor_formatter() -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[                           # records that did not come through structlog
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,     # before redaction: exception texts carry values too
            redact_phi,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
    )


def _private_file(path: Path) -> Path:
    """Create (or tighten) ``path`` 0600 and its folder 0700 before a handler appends to it."""
    private_dir(path.parent, mode=LOG_DIR_MODE)
    return private_file(path, mode=LOG_FILE_MODE)


def configure(level: str = "INFO", log_file: Path | None = None, console: bool = False) -> None:
    """JSON lines to ``log_file`` (and stderr when ``console``), for structlog, stdlib logging and warnings."""
    handlers: list[logging.Handler] = []
    if log_file is not None:
        handlers.append(logging.FileHandler(_private_file(log_file), encoding="utf-8"))
    if console or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = _processor_formatter()
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(True)                     # warnings.warn -> logger "py.warnings" -> this chain
    # pynetdicom logs at INFO with calling AE titles and, at DEBUG, whole datasets (PHI): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # libraries that configure their own handlers (Alembic's fileConfig) must not write around this one
    for name in ("alembic", "sqlalchemy", "highdicom", "pydicom", "py.warnings", "uvicorn", "uvicorn.error"):
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            lib.removeHandler(h)
        lib.propagate = True
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=False,
    )
