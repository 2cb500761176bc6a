"""Prometheus metrics, defined once and incremented where things happen.

Served at ``/metrics``. Labels never carry PHI or UIDs.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ASSOCIATIONS = Counter("dermgate_associations_total", "DICOM associations by outcome", ["outcome"])
CSTORES = Counter("dermgate_cstore_total", "C-STORE requests by answered status", ["status"])
QUEUE_DEPTH = Gauge("dermgate_jobs", "Jobs by state", ["state"])
STAGE_SECONDS = Histogram("dermgate_stage_seconds", "Time per pipeline stage", ["stage"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
JOB_LATENCY = Histogram("dermgate_job_seconds", "Receive-to-rendered time per job",
                        buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
INFERENCE_SECONDS = Histogram("dermgate_inference_seconds", "Model run time per batch", ["provider"])
EXECUTION_PROVIDER = Gauge("dermgate_execution_provider", "1 for the ONNX Runtime provider in use", ["provider"])
OUTBOX = Gauge("dermgate_outbox", "Outbox rows by channel and state", ["channel", "state"])
DELIVERIES = Counter("dermgate_deliveries_total", "Delivery attempts by channel and result", ["channel", "result"])
AUDIT_WRITE_SECONDS = Histogram("dermgate_audit_write_seconds", "Audit record write time (incl. fsync)",
                                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
INTAKE_GROUP_SIZE = Histogram("dermgate_intake_group_size", "C-STORE images made durable by one group commit",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INTAKE_COMMIT_SECONDS = Histogram("dermgate_intake_commit_seconds",
                                  "One intake group commit: object + folder fsyncs alongside the database commit",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
