"""The Worker's protocol edges are injected: the decoder and renderer it is given are the ones it
uses, and a stage error they mark permanent dead-letters the job at once instead of retrying."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from dermgate.app import Runtime
from dermgate.db import Job, JobState
from dermgate.pipeline import PipelineError, Worker
from dermgate.records import Outputs
from dermgate.service import Service
from inference.result import Prediction
from integration.dicom_scp.stages import DicomDecoder, DicomRenderer
from tests.dermgate.test_service_e2e import MODALITY_AE, make_settings, make_sources
from tests.peers.dcmtk import storescu


class RefusingRenderer:
    """Writes nothing; says whether another try could succeed."""

    def __init__(self, permanent: bool) -> None:
        self.permanent, self.calls = permanent, 0

    def render(self, source: Any, prediction: Prediction, folder: Path, image_rgb: np.ndarray | None) -> Outputs:
        self.calls += 1
        raise PipelineError("the source cannot be rendered", permanent=self.permanent)


class CountingDecoder(DicomDecoder):
    def __init__(self) -> None:
        self.decoded = 0

    def rgb(self, source: Any) -> np.ndarray:
        self.decoded += 1
        return super().rgb(source)


def _stored_jobs(tmp_path: Path) -> Runtime:
    settings = make_settings(tmp_path / "work", None)
    rt = Runtime(settings)
    scp = Service(rt, roles={"scp"})
    scp.start()
    try:
        files = make_sources(tmp_path / "src")[:2]
        assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"]).returncode == 0
    finally:
        scp.stop()
    return rt


def _run_until_idle(worker: Worker, rt: Runtime, timeout: float = 120.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while worker.run_once() and time.monotonic() < deadline:
        pass
    with rt.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_a_permanent_render_error_dead_letters_at_once_and_a_transient_one_retries(tmp_path: Path) -> None:
    rt = _stored_jobs(tmp_path)
    decoder, transient = CountingDecoder(), RefusingRenderer(permanent=False)
    worker = Worker(rt.sessions, rt.store, rt.classifier, rt.audit, rt.planners, rt.settings.worker,
                    decoder=decoder, renderer=transient)
    jobs = _run_until_idle(worker, rt)
    assert decoder.decoded == 2 and transient.calls == 2          # the injected edges did the work
    assert [j.state for j in jobs] == [JobState.RECEIVED] * 2     # to be retried after the back-off
    assert all(j.attempts == 1 for j in jobs)
    with rt.sessions.begin() as s:                                # due again now
        for job in s.scalars(select(Job)):
            job.next_attempt_at = job.created_at
    permanent = RefusingRenderer(permanent=True)
    worker = Worker(rt.sessions, rt.store, rt.classifier, rt.audit, rt.planners, rt.settings.worker,
                    decoder=decoder, renderer=permanent)
    jobs = _run_until_idle(worker, rt)
    assert [j.state for j in jobs] == [JobState.FAILED] * 2
    assert all(j.attempts == 2 < rt.settings.worker.max_attempts for j in jobs)
    assert all("cannot be rendered" in (j.last_error or "") for j in jobs)
    # The composition root wires the DICOM edges.
    built = rt.worker()
    assert isinstance(built.decoder, DicomDecoder) and isinstance(built.renderer, DicomRenderer)
    rt.close()
