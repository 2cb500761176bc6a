"""HTTP API (FastAPI): health, readiness, metrics, results and clinician review."""
