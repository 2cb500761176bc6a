#!/bin/sh
# Container entry point for dermgate.
#
#   serve [args]   verify the model's sha256 against its manifest (dermgate
#                  verify-model), then exec `dermgate serve`: a tampered or
#                  truncated model never takes work
#   healthcheck    GET http://127.0.0.1:$DERMGATE_API__PORT/healthz (the image's HEALTHCHECK)
#   anything else  exec `dermgate <args>` (migrate, jobs, outbox, audit, ...)
#
# exec keeps dermgate as PID 1's direct replacement, so SIGTERM from
# `docker stop` / Kubernetes reaches it and its graceful shutdown runs.
set -eu
[ "$#" -gt 0 ] || set -- serve

case "$1" in
  healthcheck)
    exec python -c 'import os, sys, urllib.request
port = os.environ.get("DERMGATE_API__PORT", "8080")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)'
    ;;
  serve)
    if [ -n "${DERMGATE_MODEL__PATH:-}" ]; then
      dermgate verify-model --model-dir "${DERMGATE_MODEL__PATH}"
    else
      dermgate verify-model
    fi
    exec dermgate "$@"
    ;;
  *)
    exec dermgate "$@"
    ;;
esac
