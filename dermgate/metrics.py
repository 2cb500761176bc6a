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

# Live performance and drift (dermgate/monitor.py, dermgate/drift.py), refreshed from the database at most
# every few minutes by /metrics; alert rules in deploy/prometheus/ and deploy/k8s/prometheusrule.yaml.
LIVE_AUC = Gauge("dermgate_live_auc_malignant", "Malignancy AUC against linked outcomes", ["window"])
LIVE_SENSITIVITY = Gauge("dermgate_live_sensitivity", "Sensitivity at the referral threshold", ["window"])
LIVE_SENSITIVITY_LOWER = Gauge("dermgate_live_sensitivity_lower95", "95% Wilson lower bound of the sensitivity",
                               ["window"])
LIVE_SPECIFICITY = Gauge("dermgate_live_specificity", "Specificity at the referral threshold", ["window"])
LIVE_ECE = Gauge("dermgate_live_ece_malignancy", "Expected calibration error of P(malignant)", ["window"])
LIVE_MALIGNANT = Gauge("dermgate_live_outcomes_malignant", "Malignant outcomes linked to results", ["window"])
OUTCOMES = Gauge("dermgate_outcomes", "Outcomes recorded, by link state", ["state"])
MONITOR_ALARMS = Gauge("dermgate_monitor_alarms", "Active live-performance and drift alarms", ["kind", "severity"])
DRIFT_PSI = Gauge("dermgate_drift_psi", "Population stability index against the training reference",
                  ["device", "feature"])
OOD_RATE = Gauge("dermgate_ood_rate", "Share of recent results outside the training distribution", ["device"])
CONNECTIONS_REFUSED = Counter("dermgate_dicom_connections_refused_total",
                              "DICOM connections closed before an association: refused at accept or silent",
                              ["reason"])
API_AUTH_FAILURES = Counter("dermgate_api_auth_failures_total", "HTTP API requests refused: 401, 403, 429",
                            ["status"])
INTAKE_GROUP_SIZE = Histogram("dermgate_intake_group_size", "C-STORE images made durable by one group commit",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INTAKE_COMMIT_SECONDS = Histogram("dermgate_intake_commit_seconds",
                                  "One intake group commit: object + folder fsyncs alongside the database commit",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
