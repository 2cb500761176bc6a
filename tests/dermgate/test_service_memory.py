"""Bounded memory in the worker (issue 16): 2,000 fuzzed objects took ``dermgate serve`` from 280 MB
to 1,231 MB RSS and it stayed there. bench/bench_memory.py found where: ONNX Runtime's CPU memory
arena keeps the memory of the largest batch it ever ran (8 images x 4 test-time views) for the life
of the session. The service's classifier runs without the arena, so a batch's memory goes back.
"""

from __future__ import annotations

from pathlib import Path

import cv2

from dermgate.app import Runtime
from tests.dermgate.test_service_e2e import make_settings
from tests.peers.dcmtk import sample_jpeg

MiB = 1 << 20


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_service_classifier_gives_a_batch_memory_back(tmp_path: Path) -> None:
    rt = Runtime(make_settings(tmp_path / "work", None))
    try:
        image = cv2.cvtColor(cv2.imread(str(sample_jpeg())), cv2.COLOR_BGR2RGB)
        classifier = rt.classifier
        classifier.predict([image])                        # warm: kernels chosen, weights resident
        before = rss()
        for _ in range(3):
            assert len(classifier.predict([image] * rt.settings.worker.batch_size)) == rt.settings.worker.batch_size
        growth = rss() - before
        # With the arena: about +580 MiB that never go back; without it a few tens.
        assert growth < 200 * MiB, f"RSS grew by {growth / MiB:.0f} MiB over three batches and stayed"
    finally:
        rt.close()
