"""The evaluation interface (`dermgate evaluate`): outputs, robustness, and the metric definitions."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.engine import Engine
from inference.evaluate import (PRED_COLUMNS, balanced_accuracy, bootstrap_ci, classification_metrics, ece,
                                malignant_label, run_evaluate, sensitivity_at_specificity)
from inference.result import CLASSES
from tests.inference.sampledata import SAMPLES_CSV, SAMPLES_DIR, Sample

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"malignancy_auc", "melanoma_auc", "balanced_accuracy", "sensitivity", "specificity", "ece",
               "confusion_matrix", "ci95", "n", "n_decode_errors", "n_not_assessable"}


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_on_the_samples_writes_predictions_metrics_and_plots(engine: Engine, tmp_path: Path,
                                                                       samples: list[Sample]) -> None:
    m = run_evaluate(SAMPLES_DIR, SAMPLES_CSV, tmp_path, engine, bootstrap=50, progress=False)
    for name in ("predictions.csv", "metrics.json", "roc.png", "reliability.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = _read(tmp_path / "predictions.csv")
    assert list(rows[0]) == PRED_COLUMNS
    assert [r["path"] for r in rows] == [s.path.name for s in samples]
    assert all(r["top_class"] == r["dx"] for r in rows)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert METRIC_KEYS <= on_disk.keys()
    assert on_disk["balanced_accuracy"] == pytest.approx(1.0) == m["balanced_accuracy"]
    assert on_disk["malignancy_auc"] == pytest.approx(1.0)
    assert on_disk["n"] == len(samples) and on_disk["n_decode_errors"] == 0
    cm = np.array(on_disk["confusion_matrix"]["matrix"])
    assert cm.trace() == len(samples)


def test_evaluate_is_robust_to_formats_sizes_corrupt_files_and_coarse_labels(engine: Engine, tmp_path: Path,
                                                                              samples: list[Sample]) -> None:
    """JPEG/PNG/BMP of odd sizes, a corrupt file, benign/mel-only labels, an explicit malignant
    column, an unknown dx and extra columns: everything predicted, the corrupt file listed."""
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    mel = next(s for s in samples if s.dx == "mel")
    nv = next(s for s in samples if s.dx == "nv")
    bcc = next(s for s in samples if s.dx == "bcc")
    cv2.imwrite(str(images / "sub" / "mel big.png"),
                cv2.resize(cv2.imread(str(mel.path)), (1024, 701)))
    cv2.imwrite(str(images / "nv.bmp"), cv2.resize(cv2.imread(str(nv.path)), (333, 257)))
    shutil.copy(bcc.path, images / "bcc.JPG")
    (images / "broken.jpg").write_bytes(mel.path.read_bytes()[:150])
    labels = tmp_path / "labels.csv"
    labels.write_text("\ufeffPath,DX,malignant,site\n"
                      "sub/mel big.png,MEL,,back\n"
                      "nv.bmp,benign,,arm\n"
                      "bcc.JPG,benign,1,face\n"
                      "broken.jpg,mel,,x\n"
                      "nv.bmp,,,unlabelled\n")
    m = run_evaluate(images, labels, tmp_path / "out", engine, bootstrap=20, progress=False)
    rows = _read(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 5
    assert rows[3]["risk"] == "Error" and "decodable" in rows[3]["reason"]
    assert m["n_decode_errors"] == 1 and m["n"] == 4 and m["n_unlabelled"] == 1
    assert m["n_malignant"] == 2 and m["n_benign"] == 1   # bcc counted malignant by its column
    assert m["n_seven_class"] == 1 and m["classes_present"] == ["mel"]
    assert m["malignancy_auc"] == pytest.approx(1.0)


def test_missing_columns_are_reported(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("file,diagnosis\na.jpg,nv\n")
    with pytest.raises(ValueError, match="missing column"):
        run_evaluate(tmp_path, tmp_path / "l.csv", tmp_path / "out", engine, progress=False)


def test_command_line_runs_with_a_progress_bar(tmp_path: Path) -> None:
    """`python -m inference.evaluate` works end to end (the CLI the lead wires as `dermgate evaluate`)."""
    proc = subprocess.run([sys.executable, "-m", "inference.evaluate", "--images", str(SAMPLES_DIR),
                           "--labels", str(SAMPLES_CSV), "--out", str(tmp_path), "--bootstrap", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "evaluate: 100%" in proc.stderr          # tqdm
    assert "malignancy_auc" in proc.stdout
    assert (tmp_path / "metrics.json").exists()


# -------------------------------------------------------------------------------- metric definitions
def test_labels_from_dx_and_malignant_column() -> None:
    assert [malignant_label(d) for d in ("mel", "bcc", "akiec", "nv", "bkl", "df", "vasc")] == [1, 1, 1, 0, 0, 0, 0]
    assert malignant_label("benign") == 0 and malignant_label("mel") == 1 and malignant_label("") is None
    assert malignant_label("benign", "1") == 1 and malignant_label("nv", "1.0") == 1
    assert malignant_label("mel", "0") == 0 and malignant_label("x", "maybe") is None


def test_balanced_accuracy_averages_recall_over_present_classes() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 2])   # class 2 predicted but absent: counts as an error only
    assert balanced_accuracy(y, pred) == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident() -> None:
    conf = np.full(100, 0.7)
    hits = np.r_[np.ones(70), np.zeros(30)]
    assert ece(conf, hits) == pytest.approx(0.0)
    assert ece(np.full(100, 0.99), hits) == pytest.approx(0.29)


def test_sensitivity_at_specificity_reads_the_roc() -> None:
    y = np.array([0] * 10 + [1] * 10)
    s = np.r_[np.linspace(0, 0.5, 10), np.linspace(0.3, 1.0, 10)]
    # at most 2 of 10 benign above the cut: threshold 0.44 keeps 8 of 10 malignant
    assert sensitivity_at_specificity(y, s, 0.8) == pytest.approx(0.8)


def test_classification_metrics_on_a_perfect_and_a_useless_model() -> None:
    dx = list(CLASSES) * 3
    perfect = np.eye(7)[[CLASSES.index(d) for d in dx]] * 0.94 + 0.01
    m = classification_metrics(dx, perfect, 0.5)
    assert m["balanced_accuracy"] == 1.0 and m["malignancy_auc"] == 1.0 and m["melanoma_auc"] == 1.0
    assert (m["sensitivity"], m["specificity"]) == (1.0, 1.0)
    flat = np.full((len(dx), 7), 1 / 7)
    assert classification_metrics(dx, flat, 0.5)["malignancy_auc"] == 0.5


def test_bootstrap_ci_brackets_the_estimate_and_groups_resample_whole_lesions() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    ci = bootstrap_ci(lambda idx: {"mean": float(x[idx].mean())}, len(x), samples=300)["mean"]
    assert ci[0] < x.mean() < ci[1] and ci[1] - ci[0] < 0.3
    # 20 lesions of 20 identical images each: the CI must be as wide as for 20 independent points
    lesion_values = rng.normal(size=20)
    y = np.repeat(lesion_values, 20)
    groups = np.repeat(np.arange(20), 20).astype(str)
    wide = bootstrap_ci(lambda idx: {"m": float(y[idx].mean())}, len(y), groups, samples=300)["m"]
    naive = bootstrap_ci(lambda idx: {"m": float(y[idx].mean())}, len(y), None, samples=300)["m"]
    assert wide[1] - wide[0] > 2.5 * (naive[1] - naive[0])
