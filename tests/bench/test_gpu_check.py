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
