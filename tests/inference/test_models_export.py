"""Calibration choices made by models/export.py (needs the ``train`` extra: skipped without torch)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from inference.postprocess import MALIGNANT_IDX, calibrated, malignancy  # noqa: E402
from models.export import (  # noqa: E402
    MeanEnsemble,
    fit_malignancy_bias,
    fit_temperature,
    referral_threshold,
    specificity_threshold,
)


def test_referral_threshold_keeps_the_target_sensitivity_on_the_data_it_was_fitted_on() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.2).astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    t = referral_threshold(p, y, 0.95)
    assert (p[y == 1] >= t).mean() >= 0.95
    pos = np.sort(p[y == 1])[::-1]
    k = int(np.ceil(0.95 * len(pos)))
    assert pos[k] < t <= pos[k - 1]  # any higher cut would lose the k-th malignant case


def test_specificity_threshold_keeps_the_target_specificity() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(1000) < 0.2).astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    t = specificity_threshold(p, y, 0.95)
    assert (p[y == 0] < t).mean() >= 0.95
    assert (p[y == 0] < t).mean() < 0.95 + 2 / (y == 0).sum()


def test_temperature_recovers_the_scale_of_overconfident_logits() -> None:
    """Logits drawn from a calibrated model then multiplied by 3: the fitted temperature is about 3."""
    rng = np.random.default_rng(2)
    true_logits = rng.normal(0, 1.5, size=(4000, 7))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(7, p=row) for row in p])
    t = fit_temperature((true_logits * 3).astype(np.float32), y)
    assert t == pytest.approx(3.0, rel=0.1)


def test_malignancy_bias_undoes_an_inflated_malignant_share() -> None:
    """Calibrated logits with +1 added to the malignant classes (as a class-weighted
    loss does): the fitted bias is about -1, and it brings P(malignant) back to the
    observed malignant rate without changing its ranking."""
    rng = np.random.default_rng(3)
    true_logits = rng.normal(0, 1.5, size=(6000, 7))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(7, p=row) for row in p])
    inflated = true_logits.copy()
    inflated[:, MALIGNANT_IDX] += 1.0
    b = fit_malignancy_bias(inflated.astype(np.float32), y, 1.0)
    assert b == pytest.approx(-1.0, abs=0.15)
    before, after = malignancy(calibrated(inflated, 1.0)), malignancy(calibrated(inflated, 1.0, b))
    observed = np.isin(y, MALIGNANT_IDX).mean()
    assert abs(after.mean() - observed) < 0.02 < abs(before.mean() - observed)
    assert (np.argsort(before, kind="stable") == np.argsort(after, kind="stable")).all()


class _TinyNet(torch.nn.Module):
    """The two methods MeanEnsemble relies on, as EfficientNet has them."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self._fc = torch.nn.Linear(4, 7)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.extract_features(x).mean((2, 3)))


def test_mean_ensemble_is_still_pool_plus_one_linear_head() -> None:
    """Mean of the members' logits == the ensemble's head over its concatenated
    features, so the CAM computed from the exported features stays exact."""
    members = [_TinyNet(1), _TinyNet(2)]
    ens = MeanEnsemble(members).eval()
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        mean_logits = torch.stack([m(x) for m in members]).mean(0)
        feats = ens.extract_features(x)
        via_head = ens._fc(feats.mean((2, 3)))
    assert feats.shape == (3, 8, 7, 7)
    torch.testing.assert_close(ens(x), mean_logits)
    torch.testing.assert_close(via_head, mean_logits)


def test_members_recovered_from_an_exported_ensemble_reproduce_its_logits(tmp_path) -> None:
    """Export a 2-member MeanEnsemble with BatchNorms that are not identities, then recover the
    members from the ONNX file alone (BN folded into the convs): same logits as the graph."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from models.export import export_onnx
    from models.from_onnx import check_against_onnx, members_from_onnx
    from models.arch import build_model
    torch.manual_seed(0)
    members = [build_model("efficientnet-lite0", 0.3) for _ in range(2)]
    with torch.no_grad():
        for m in members:  # non-trivial BN statistics, so that folding matters
            for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "ens.onnx"
    export_onnx(MeanEnsemble([m.eval() for m in members]).eval(), path, 64)
    recovered = members_from_onnx(path, "efficientnet-lite0", 2, 0.3, size=64)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    assert check_against_onnx(path, recovered, x) < 1e-3
    with torch.no_grad():  # each member is itself up to its head's bias, which the graph keeps only as a mean
        diff = recovered[0](torch.from_numpy(x)).numpy() - members[0](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(diff[0], diff[1], atol=1e-3)
    expected = torch.stack([m._fc.bias for m in members]).mean(0) - members[0]._fc.bias
    np.testing.assert_allclose(diff[0], expected.detach().numpy(), atol=1e-3)
