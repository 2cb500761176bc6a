"""The FastAPI application: the JSON API's routers (one per resource) and the web console.

Routes stay thin over the core (``dermgate.results``, ``dermgate.review``, ``dermgate.health``);
the console (``dermgate.console``) is mounted on the same app and shares that core.
"""

from __future__ import annotations

from fastapi import FastAPI

from dermgate import __version__
from dermgate.api.routers import ops, outbox, results, reviews
from dermgate.app import Runtime
from dermgate.health import readiness  # noqa: F401 - re-exported for older imports
from inference.result import DISCLAIMER


def create_app(rt: Runtime, *, check_model: bool = True) -> FastAPI:
    app = FastAPI(title="dermgate", version=__version__,
                  description="Dermoscopy AI decision support: results, review, health. " + DISCLAIMER)
    app.state.runtime = rt
    app.state.check_model = check_model

    for router in (ops.router, results.router, reviews.router, outbox.router):
        app.include_router(router)

    from dermgate.console import install as install_console
    install_console(app, rt)
    return app
