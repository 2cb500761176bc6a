"""The FastAPI application: the JSON API's routers (one per resource) and the web console.

Routes stay thin over the core (``dermgate.results``, ``dermgate.review``, ``dermgate.health``);
the console (``dermgate.console``) is mounted on the same app and shares that core.
"""

from __future__ import annotations

from fastapi import FastAPI

from dermgate import __version__
from dermgate.api.outcomes import router as outcomes_router
from dermgate.api.routers import ops, outbox, results, reviews
from dermgate.api.security import install as install_security
from dermgate.app import Runtime
from dermgate.health import readiness  # noqa: F401 - re-exported for older imports
from inference.result import DISCLAIMER


def create_app(rt: Runtime, *, check_model: bool = True, check_ehr: bool = False) -> FastAPI:
    app = FastAPI(title="dermgate", version=__version__, docs_url=None, redoc_url=None,
                  description="Dermoscopy AI decision support: results, review, health. " + DISCLAIMER)
    app.state.runtime = rt
    app.state.check_model = check_model
    app.state.check_ehr = check_ehr
    install_security(app, rt.settings.api, rt.settings.api_tokens_file, rt.audit)   # auth, limits, headers, /docs

    for router in (ops.router, results.router, reviews.router, outbox.router, outcomes_router):
        app.include_router(router)
    from dermgate.api.dicomweb import router as dicomweb_router
    app.include_router(dicomweb_router())          # STOW-RS in (PS3.18 10.5)

    from dermgate.console import install as install_console
    install_console(app, rt)
    return app
