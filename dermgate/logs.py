"""Structured JSON application logs (structlog), with no PHI.

Application logs carry UIDs only where needed and never patient names, ids or
birth dates; the redaction processor below is defence in depth, the rule is
not to pass PHI to a logger at all. PHI lives in the database and the
encrypted audit trail only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

from audit.phi import redact_phi

def configure(level: str = "INFO", log_file: Path | None = None, console: bool = False) -> None:
    """JSON lines to ``log_file`` (and stderr when ``console``)."""
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    if console or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(level)
    # pynetdicom logs at INFO with calling AE titles and, at DEBUG, whole datasets (PHI): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_phi,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=False,
    )
