"""The JSON API's routers, one per resource: ops (health, readiness, metrics, JWKS),
results, reviews, outbox."""
