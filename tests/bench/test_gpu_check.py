"""bench/gpu_check.py where there is no GPU (as in CI): it refuses clearly, or with --allow-cpu
runs every step on the CPU and labels the figures so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_check


def test_arguments_default_to_the_issue_batches_and_reject_nonsense() -> None:
    args = gpu_check.parse_args([])
    assert args.batches == [1, 8, 64, 256] and not args.allow_cpu and args.workers == 4
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--batches", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--images", "0"])


def test_without_cuda_it_stops_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    status = gpu_check.main(["--batches", "1", "--seconds", "0.1", "--workers", "0", "--json", str(out)])
    assert status == 2
    err = capsys.readouterr().err
    assert "NO GPU" in err and "--allow-cpu" in err
    assert "CUDAExecutionProvider" in json.loads(out.read_text())["error"]


def test_allow_cpu_runs_every_step_and_labels_it_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    status = gpu_check.main(["--allow-cpu", "--batches", "1", "2", "--seconds", "0.1", "--workers", "0",
                             "--no-tensorrt", "--json", str(out)])
    assert status == 0
    figures = json.loads(out.read_text())
    assert figures["engine_provider"] == "CPUExecutionProvider"
    assert [r["batch"] for r in figures["throughput"]] == [1, 2]
    assert all(r["bare"] > 0 and r["engine_cam"] > 0 for r in figures["throughput"])
    printed = capsys.readouterr().out
    assert "NOT GPU figures" in printed and "CPU (dry run" in printed


def test_allow_cpu_end_to_end_with_two_scps_is_exactly_once(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The end-to-end step as it runs on a GPU host: SCP and worker processes of `dermgate serve`
    on one work dir, C-STOREs from forked SCUs spread over the SCPs; every image delivered once."""
    out = tmp_path / "gpu.json"
    status = gpu_check.main(["--allow-cpu", "--batches", "1", "--seconds", "0.1", "--no-tensorrt",
                             "--workers", "1", "--scps", "2", "--associations", "1", "--images", "6",
                             "--worker-batch", "4", "--json", str(out)])
    assert status == 0, capsys.readouterr().err[-2000:]
    e2e = json.loads(out.read_text())["end_to_end"]
    assert e2e["exactly_once"] is True and e2e["images"] == e2e["delivered"] == e2e["reports"] == 6
    assert e2e["scps"] == 2 and e2e["worker_providers"] == ["CPUExecutionProvider"]
