"""A deterministic fuzz corpus against the real SCP: 300 mutants of valid objects (fuzz.py, seed 16),
sent with pynetdicom over a few associations to the SCP on a real SQLite database and folder store.

Each mutant gets one of the documented statuses (docs/dicom-conformance.md), never the 0xC000 of an
unexpected error and never silence; nothing is stored half; the service answers C-ECHO after; and
every mutant answered Success becomes its SC, its SR and its report (the worker with the committed
model, the FHIR bundle planner), so that Success means a result.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from audit.api import EventType
from dermgate.channels import FHIR_FILE_CHANNEL, BundleDirectoryChannel, FhirPlanner
from dermgate.db import Instance, JobState, OutboxItem, OutboxState
from dermgate.pipeline import Dispatcher, Worker
from dermgate.settings import WorkerSettings
from integration.dicom_scp import status as st
from integration.dicom_scp.stages import DicomDecoder, DicomRenderer
from integration.fhir.settings import FhirSettings
from tests.integration.dicom_scp.fuzz import Answer, Mutant, base_objects, corpus, send_all
from tests.integration.dicom_scp.scp_support import LOCALHOST, MODALITY, SCP_AET, Harness, dicom_settings, running_scp
from tests.peers.audit import ListAudit
from tests.peers.dcmtk import echoscu, sample_jpeg

SEED, N = 16, 300
# What a C-STORE may be answered with (handlers.handle_store, docs/dicom-conformance.md): everything
# but 0xC000, which means an error nobody anticipated.
DOCUMENTED = frozenset(st.STATUS_NAMES) - {st.CANNOT_UNDERSTAND}


@dataclass
class Fuzzed:
    scp: Harness
    answers: list[tuple[Mutant, Answer]]

    def with_status(self, *codes: int) -> list[Mutant]:
        return [m for m, a in self.answers if a.status in codes]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    bases = base_objects(tmp_path_factory.mktemp("bases"), sample_jpeg())
    mutants = list(corpus(bases, N, SEED))
    with running_scp(tmp_path_factory.mktemp("scp"), dicom_settings(max_pixels=10_000_000)) as scp:
        answers = list(send_all(LOCALHOST, scp.port, mutants, calling=MODALITY, called=SCP_AET))
        yield Fuzzed(scp, answers)


def test_the_corpus_is_the_same_on_every_run(tmp_path: Path) -> None:
    bases = base_objects(tmp_path, sample_jpeg())
    first, again = list(corpus(bases, 40, SEED)), list(corpus(bases, 40, SEED))
    assert first == again
    assert len({m.data for m in first}) == 40 and len({m.name.split(":")[0] for m in first}) >= 6


def test_every_mutant_gets_a_documented_status_and_failures_say_why(fuzzed: Fuzzed) -> None:
    assert len(fuzzed.answers) == N
    undocumented = [(m.index, m.name, a) for m, a in fuzzed.answers if a.status not in DOCUMENTED]
    assert not undocumented, undocumented
    silent = [(m.index, m.name, a) for m, a in fuzzed.answers if a.status != st.SUCCESS and not a.comment]
    assert not silent, silent
    assert all(len(a.comment or "") <= st.ERROR_COMMENT_MAX for _, a in fuzzed.answers)
    counts = collections.Counter(a.status for _, a in fuzzed.answers)
    # The corpus reaches both sides: accepted objects and each kind of refusal the checks make.
    assert {st.SUCCESS, st.MISSING_ATTRIBUTE, st.UNDECODABLE_PIXEL_DATA, st.UNREADABLE_DATASET} <= set(counts), counts


def test_every_status_is_audited_and_nothing_is_stored_half(fuzzed: Fuzzed) -> None:
    scp = fuzzed.scp
    accepted = {m.sop_instance for m in fuzzed.with_status(st.SUCCESS)}
    assert {i.sop_instance_uid for i in scp.instances()} == accepted
    assert len(scp.jobs()) == len(accepted)
    scp.assert_intact()
    leftovers = [p for p in scp.store.root.rglob("*") if p.is_file() and p.suffix == ".tmp"]
    assert not leftovers, leftovers
    audited = collections.Counter(e.sop_instance_uids for e in scp.audit.of(EventType.STORE_RECEIVED))
    assert all(audited[(m.sop_instance,)] == 1 for m, a in fuzzed.answers if a.status == st.SUCCESS)
    assert sum(audited.values()) == N


def test_the_service_answers_echo_after_the_corpus(fuzzed: Fuzzed) -> None:
    assert echoscu(LOCALHOST, fuzzed.scp.port, calling=MODALITY, called=SCP_AET).returncode == 0


def test_every_accepted_mutant_becomes_its_sc_sr_and_report(fuzzed: Fuzzed, tmp_path: Path) -> None:
    """The worker (the committed model; one view, no test-time augmentation, for time) and the
    dispatcher take every Success to its outputs."""
    from inference.engine import Engine
    scp = fuzzed.scp
    cfg = WorkerSettings(batch_size=8, max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02)
    planner = FhirPlanner(FHIR_FILE_CHANNEL, FhirSettings())
    worker = Worker(scp.sessions, scp.store, Engine(intra_op_threads=2, tta=False, cpu_memory_arena=False), ListAudit(),
                    [planner], cfg, decoder=DicomDecoder(), renderer=DicomRenderer(scp.store))
    dispatcher = Dispatcher(scp.sessions, {FHIR_FILE_CHANNEL: BundleDirectoryChannel(tmp_path / "bundles")}, cfg,
                            ListAudit())
    while worker.run_once() or dispatcher.run_once():
        pass
    names = {m.sop_instance: m.name for m, _ in fuzzed.answers}
    with scp.sessions() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.id)).all()
    by_instance = {iid: sop for sop, iid in rows}
    unfinished = [(names[by_instance[j.instance_id]], j.state.value, j.last_error) for j in scp.jobs()
                  if j.state is not JobState.DELIVERED]
    assert not unfinished, unfinished
    for job in scp.jobs():
        sop = by_instance[job.instance_id]
        sc, sr = (dcmread(scp.store.path(job.outputs[k])) for k in ("sc_path", "sr_path"))
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sop
        assert sr.CurrentRequestedProcedureEvidenceSequence
        assert (tmp_path / "bundles" / f"{sop}_report.json").is_file()
    with scp.sessions() as s:
        assert all(o.state is OutboxState.SENT for o in s.scalars(select(OutboxItem)))
