"""A crash mid-write leaves a torn tail: verify reports it, record refuses it, repair seals it."""

from __future__ import annotations

import hashlib
import json

import pytest

from audit.errors import TornTailError
from audit.format import LOG_FILE
from tests.audit.helpers import store_event


def _tear(trail, audit_dir) -> bytes:
    """Simulate power loss mid-append: half of a real next record reaches the disk, no newline.

    (A killed process cannot tear one write(2) of a regular file, so the torn bytes are written by hand.)
    """
    trail.record(store_event(99))
    data = (audit_dir / LOG_FILE).read_bytes()
    last = data.splitlines(keepends=True)[-1]
    torn = last[: len(last) // 2]
    (audit_dir / LOG_FILE).write_bytes(data[: -len(last)] + torn)
    return torn


def test_verify_reports_a_torn_tail_at_the_record_that_was_being_written(make_trail, audit_dir):
    trail = make_trail()
    for i in range(3):
        trail.record(store_event(i))
    _tear(trail, audit_dir)                              # record 4 was being written
    report = trail.verify()
    assert not report.ok and report.first_bad.seq == 4 and "torn tail" in report.first_bad.reason


def test_record_refuses_to_chain_onto_a_torn_tail(make_trail, audit_dir):
    trail = make_trail()
    _tear(trail, audit_dir)
    with pytest.raises(TornTailError, match="dermgate audit repair"):
        trail.record(store_event(1))


def test_repair_cuts_the_torn_bytes_keeps_them_and_appends_a_signed_repair_record(make_trail, audit_dir):
    trail = make_trail()
    trail.record(store_event(0))
    torn = _tear(trail, audit_dir)
    result = trail.repair("os:ops")
    assert result.torn_bytes == len(torn) and result.saved_as is not None
    assert result.saved_as.read_bytes() == torn
    last = json.loads((audit_dir / LOG_FILE).read_bytes().splitlines()[-1])
    assert last["kind"] == "repair" and last["seq"] == result.sealed_seq == 2 and last["by"] == "os:ops"
    assert last["torn"]["sha256"] == hashlib.sha256(torn).hexdigest() and last["torn"]["bytes"] == len(torn)
    report = trail.verify()
    assert report.ok and report.repairs == [2], report.summary()
    assert trail.record(store_event(5)) == 3                 # writing resumes on the sealed chain
    assert trail.verify().ok


def test_repair_of_an_intact_but_unsealed_log_adds_a_checkpoint(make_trail, audit_dir):
    trail = make_trail()
    trail.record(store_event())
    result = trail.repair("os:ops")
    assert result.torn_bytes == 0 and result.sealed_seq == 2
    assert trail.repair("os:ops").sealed_seq is None                 # already sealed: nothing to do


def test_a_torn_tail_is_never_repaired_by_the_next_record_only_by_the_operator(make_trail, audit_dir):
    """Issue 12: the next audited action used to "repair" a cut; now only `audit repair --confirm` does."""
    trail = make_trail()
    _tear(trail, audit_dir)
    other_process = make_trail()
    with pytest.raises(TornTailError):
        other_process.record(store_event(2))
    assert not other_process.verify().ok                    # still reported, nothing cut
