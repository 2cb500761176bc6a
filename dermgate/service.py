"""A running dermgate process: any of SCP, workers, dispatcher and HTTP API.

Graceful shutdown (SIGTERM): stop accepting associations first, let in-flight
associations and stages finish, then release every lease this process still
holds, so no job waits for a lease to expire. After a crash (kill -9), the next
start removes the temporary files the dead process left in the store, and its
workers release the dead process's leases (``queue.release_dead_owners``).
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from audit.api import AuditEvent, EventType, Outcome
from dermgate import __version__
from dermgate.app import Runtime
from dermgate.pipeline import run_loop
from dermgate.wakeup import Wakeup

log = structlog.get_logger("dermgate.service")

ROLES = frozenset({"scp", "worker", "dispatcher", "api"})


class Service:
    def __init__(self, rt: Runtime, roles: set[str] | frozenset[str] = ROLES, workers: int = 1) -> None:
        unknown = set(roles) - ROLES
        if unknown:
            raise ValueError(f"unknown roles: {sorted(unknown)}")
        self.rt, self.roles, self.n_workers = rt, set(roles), workers
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.loops: list[Any] = []
        self.scp: Any = None
        self.group_commit: Any = None
        # In-process wake-ups: new jobs wake the workers, new outbox rows the dispatchers (dermgate/wakeup.py).
        self.jobs_ready, self.outbox_ready = Wakeup(), Wakeup()
        self._wakes: list[threading.Event] = []
        self.api_server: Any = None
        self.api_app: Any = None

    def start(self) -> None:
        rt = self.rt
        rt.audit.record(AuditEvent(event=EventType.APP_START, outcome=Outcome.SUCCESS, actor="dermgate",
                                   detail={"version": __version__, "roles": sorted(self.roles)}))
        self._audit_config_change()
        self._clean_store()
        if "worker" in self.roles:
            _ = rt.classifier  # load + verify the model before taking work
            for i in range(self.n_workers):
                w = rt.worker(on_planned=self.outbox_ready.notify)
                self.loops.append(w)
                self._thread(f"worker-{i}", w.run_once, self.jobs_ready)
        if "dispatcher" in self.roles:
            # One loop per channel: the EHR and the PACS are delivered to side by side, and a slow
            # or unreachable one delays only its own rows.
            for d in rt.dispatchers():
                self.loops.append(d)
                self._thread(f"dispatcher-{next(iter(d.channels))}", d.run_once, self.outbox_ready)
        if "api" in self.roles:
            self._start_api()
        if "scp" in self.roles:
            from integration.dicom_scp.scp import DicomService
            if not rt.settings.dicom.allowed_callers and not rt.settings.dicom.accept_unknown_callers:
                log.warning("scp_allow_list_empty", note="every association will be rejected: "
                            "configure dicom.allowed_callers (AE title + hosts)")
            self.group_commit = rt.group_commit(on_commit=self.jobs_ready.notify)
            self.scp = DicomService(rt.settings.dicom, self.group_commit.intake, self.group_commit.audit, rt.store)
            self.scp.start()
        log.info("service_started", roles=sorted(self.roles), version=__version__)

    def _audit_config_change(self) -> None:
        """Record the effective configuration when it differs from the last one this work dir ran with
        (HIPAA 164.312(b): configuration changes are security-relevant). Paths only, never key material."""
        import hashlib
        import json
        public = self.rt.settings.public_dict()
        digest = hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()
        marker = self.rt.settings.workdir / ".config-sha256"
        previous = marker.read_text().strip() if marker.exists() else None
        if previous == digest:
            return
        self.rt.audit.record(AuditEvent(event=EventType.CONFIG_CHANGE, outcome=Outcome.SUCCESS, actor="dermgate",
                                        action="U", detail={"sha256": digest, "previous_sha256": previous,
                                                            "settings": public}))
        from dermgate.durable import write_atomic
        write_atomic(marker, digest.encode())

    def _clean_store(self) -> None:
        """Remove the temporary files dead processes left in the store (a kill -9 mid-write)."""
        removed = self.rt.store.clean_orphans()
        if removed:
            log.warning("orphaned_temporary_files_removed", count=len(removed),
                        files=[str(o.path.relative_to(self.rt.store.root)) for o in removed[:20]],
                        why=sorted({o.why for o in removed})[:5])

    def _thread(self, name: str, step: Any, wakeup: Wakeup | None = None) -> None:
        wake = wakeup.subscribe() if wakeup is not None else None
        if wake is not None:
            self._wakes.append(wake)
        t = threading.Thread(target=run_loop, args=(step, self.stop_event, self.rt.settings.worker.poll_interval_s,
                                                    wake), name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _start_api(self) -> None:
        import uvicorn

        from dermgate.api.main import create_app
        app = create_app(self.rt, check_model="worker" in self.roles, check_ehr="dispatcher" in self.roles)
        api = self.rt.settings.api
        tls: dict[str, Any] = {}
        if api.tls_cert_file and api.tls_key_file:
            tls = {"ssl_certfile": str(api.tls_cert_file), "ssl_keyfile": str(api.tls_key_file),
                   "ssl_ciphers": "ECDHE+AESGCM:ECDHE+CHACHA20"}   # BCP 195 AEAD suites
        # proxy_headers off: X-Forwarded-For counts only from api.trusted_proxies (dermgate/api/security.py),
        # not from whatever uvicorn's FORWARDED_ALLOW_IPS default (loopback) would trust.
        cfg = uvicorn.Config(app, host=api.host, port=api.port, log_level="warning", access_log=False,
                             proxy_headers=False, server_header=False, **tls)
        if tls:
            import ssl
            cfg.load()
            cfg.ssl.minimum_version = ssl.TLSVersion.TLSv1_2  # type: ignore[union-attr]
        self.api_app = app
        self.api_server = uvicorn.Server(cfg)
        self.api_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        t = threading.Thread(target=self.api_server.run, name="api", daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        if self.scp is not None:
            self.scp.stop()
        if self.group_commit is not None:
            self.group_commit.close()
        self.stop_event.set()
        for wake in self._wakes:              # loops waiting for work see the stop at once
            wake.set()
        if self.api_server is not None:
            self.api_server.should_exit = True
        for t in self.threads:
            t.join(timeout)
        if self.api_app is not None:
            self.api_app.state.security.close()     # write the pending coalesced audit summaries
        released = sum(loop.release_all() for loop in self.loops)
        self.rt.audit.record(AuditEvent(event=EventType.APP_STOP, outcome=Outcome.SUCCESS, actor="dermgate",
                                        detail={"released_leases": released}))
        log.info("service_stopped", released_leases=released)
