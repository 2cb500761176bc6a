"""The engine with the committed model: classification of real dermoscopy images,
the contract of a Prediction, input errors, the quality gate and model integrity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.engine import (MANIFEST_FILE, Engine, decode_image, default_model_dir, device_uid,
                              load_image, merge_tta, tta_batch)
from inference.errors import ImageDecodeError, InvalidInputError, ModelIntegrityError, ModelLoadError
from inference.result import CLASSES, MALIGNANT, Risk
from tests.inference.sampledata import Sample, load_samples


@pytest.mark.parametrize("sample", load_samples(), ids=lambda s: f"{s.path.stem}-{s.dx}")
def test_clear_sample_gets_its_diagnosis(engine: Engine, sample: Sample) -> None:
    """Each committed sample (chosen as a clear case, see ATTRIBUTION.md) is classified as its label."""
    pred = engine.predict([sample.image()], cam=False)[0]
    assert pred.assessable, pred.reason
    assert pred.top_class == sample.dx, pred.ranked()[:3]


def test_malignant_samples_are_referred_and_clear_naevi_are_low_risk(engine: Engine, samples: list[Sample]) -> None:
    """Risk follows the manifest's cut-offs: malignant clear cases at least Medium, naevi Low."""
    preds = engine.predict([s.image() for s in samples], cam=False)
    for s, p in zip(samples, preds):
        if s.dx in MALIGNANT:
            assert p.risk in (Risk.MEDIUM, Risk.HIGH), (s.path.name, p.malignancy_probability)
        if s.dx == "nv":
            assert p.risk is Risk.LOW, (s.path.name, p.malignancy_probability)


def test_prediction_contract(engine: Engine, samples: list[Sample]) -> None:
    """Probabilities cover the 7 classes and sum to 1; p_malignant = mel + bcc + akiec;
    uncertainty is a normalised entropy; the model identity is filled in."""
    for p in engine.predict([s.image() for s in samples[:4]], cam=False):
        assert tuple(p.probabilities) == CLASSES
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.malignancy_probability == pytest.approx(sum(p.probabilities[c] for c in MALIGNANT), abs=1e-5)
        assert 0.0 <= p.uncertainty <= 1.0
        assert p.low_confidence == (p.uncertainty >= engine.calibration.low_confidence_threshold)
        assert p.model.sha256 == engine.manifest.sha256
        json.dumps(p.to_json())


def test_batched_run_equals_one_by_one(samples: list[Sample]) -> None:
    """Batching (here 3 per run, so batches are split) does not change any answer."""
    eng = Engine(batch_size=3, intra_op_threads=1)
    images = [s.image() for s in samples[:7]]
    together = eng.predict(images, cam=False)
    alone = [eng.predict([im], cam=False)[0] for im in images]
    for a, b in zip(together, alone):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)


def test_any_image_size_is_accepted(engine: Engine, samples: list[Sample]) -> None:
    """A large phone-sized frame and a small crop are squashed to the model's input like training."""
    img = samples[0].image()
    big = cv2.resize(img, (1600, 1200), interpolation=cv2.INTER_CUBIC)
    small = cv2.resize(img, (80, 64), interpolation=cv2.INTER_AREA)
    p_big, p_small = engine.predict([big, small])
    assert p_big.cam is not None and p_big.cam.shape == (1200, 1600)
    assert p_small.cam is not None and p_small.cam.shape == (64, 80)
    assert p_big.top_class == samples[0].dx


def test_tta_views_are_flips_and_merge_averages() -> None:
    """TTA stacks identity, h-, v- and hv-flips view-major and averages per image."""
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    v = tta_batch(x)
    assert v.shape == (8, 3, 4, 4)
    np.testing.assert_array_equal(v[2], x[0, :, :, ::-1])
    np.testing.assert_array_equal(v[5], x[1, :, ::-1, :])
    logits = np.stack([np.full(7, k, np.float32) for k in range(8)])
    np.testing.assert_allclose(merge_tta(logits, 2), [np.full(7, 3.0), np.full(7, 4.0)])


@pytest.mark.parametrize("bad, message", [
    ("not an image", "numpy array"),
    (np.zeros((100, 100), np.uint8), "HxWx3"),
    (np.zeros((100, 100, 4), np.uint8), "HxWx3"),
    (np.zeros((100, 100, 3), np.float32), "uint8"),
    (np.zeros((0, 100, 3), np.uint8), "empty"),
])
def test_wrong_input_raises_a_clear_error(engine: Engine, bad: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        engine.predict([np.zeros((100, 100, 3), np.uint8) + 120, bad])  # type: ignore[list-item]


def _texture(rng: np.random.Generator, colour: tuple[int, int, int], shape=(300, 400)) -> np.ndarray:
    img = np.zeros((*shape, 3), np.float32) + np.asarray(colour, np.float32)
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_non_dermoscopy_images_are_not_assessable(engine: Engine) -> None:
    """Blank, tiny, greyscale and green frames get NOT_ASSESSABLE with a reason and no CAM.
    (A uniformly blue frame is not caught: many real dermatoscopes give skin a blue cast.)"""
    rng = np.random.default_rng(1)
    grey = np.repeat(_texture(rng, (128, 128, 128))[..., :1], 3, axis=2)
    cases = {
        "blank": np.full((450, 600, 3), 200, np.uint8),
        "tiny": _texture(rng, (180, 120, 100), shape=(40, 50)),
        "greyscale": grey,
        "green": _texture(rng, (40, 170, 60)),
    }
    preds = dict(zip(cases, engine.predict(list(cases.values()))))
    for name, want in [("blank", "uniform"), ("tiny", "too small"), ("greyscale", "greyscale"),
                       ("green", "green")]:
        p = preds[name]
        assert not p.assessable and p.risk is Risk.NOT_ASSESSABLE and p.cam is None, name
        assert want in (p.reason or ""), (name, p.reason)


def test_samples_pass_the_quality_gate(engine: Engine, samples: list[Sample]) -> None:
    assert all(p.assessable for p in engine.predict([s.image() for s in samples], cam=False))


def test_corrupt_or_truncated_file_raises_decode_error(tmp_path: Path, samples: list[Sample]) -> None:
    data = samples[0].path.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[:200])
    (tmp_path / "text.jpg").write_text("this is not a JPEG")
    for name in ("trunc.jpg", "text.jpg"):
        with pytest.raises(ImageDecodeError, match="not a decodable image"):
            load_image(tmp_path / name)
    with pytest.raises(ImageDecodeError):
        decode_image(b"")


def test_png_bmp_grey_and_16_bit_files_decode_to_rgb(tmp_path: Path, samples: list[Sample]) -> None:
    rgb = samples[0].image()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    cv2.imwrite(str(tmp_path / "a.bmp"), bgr)
    cv2.imwrite(str(tmp_path / "g.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(tmp_path / "d.png"), bgr.astype(np.uint16) * 257)
    for name in ("a.png", "a.bmp", "d.png"):
        np.testing.assert_array_equal(load_image(tmp_path / name), rgb)
    assert load_image(tmp_path / "g.png").shape == rgb.shape


def _copy_model(tmp_path: Path) -> tuple[Path, dict]:
    src = default_model_dir()
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    shutil.copy(src / manifest["onnx"]["file"], tmp_path / manifest["onnx"]["file"])
    return tmp_path, manifest


def test_modified_model_file_is_refused(tmp_path: Path) -> None:
    """One flipped byte in the ONNX file: the sha256 check refuses to load it."""
    d, manifest = _copy_model(tmp_path)
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    onnx = d / manifest["onnx"]["file"]
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Engine(d)


def test_manifest_with_other_classifier_weights_is_refused(tmp_path: Path) -> None:
    """fc weights that do not reproduce the graph's logits (so the CAM would lie) are caught at warm-up."""
    import base64
    d, manifest = _copy_model(tmp_path)
    w = manifest["cam"]["fc_weight"]
    arr = np.frombuffer(base64.b64decode(w["base64"]), dtype=w["dtype"]).copy()
    arr[::7] *= -1
    w["base64"] = base64.b64encode(arr.tobytes()).decode()
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="classifier weights"):
        Engine(d)


def test_missing_model_or_manifest_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="manifest"):
        Engine(tmp_path)
    d, manifest = _copy_model(tmp_path)
    (d / manifest["onnx"]["file"]).unlink()
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="not found"):
        Engine(d)


def test_io_binding_gives_the_same_answers(samples: list[Sample]) -> None:
    """The IO-binding path (the default on a GPU provider) runs the same graph: same logits, same CAMs."""
    images = [s.image() for s in samples[:4]]
    bound = Engine(intra_op_threads=1, io_binding=True)
    plain = Engine(intra_op_threads=1, io_binding=False)
    assert bound.io_binding and not plain.io_binding
    for a, b in zip(bound.predict(images), plain.predict(images)):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        assert np.allclose(a.cam, b.cam, atol=1e-6)


def test_engine_accepts_the_onnx_file_path_too(engine: Engine) -> None:
    other = Engine(engine.onnx_path, warmup=False)
    assert other.model_info == engine.model_info


def test_model_identity_and_providers(engine: Engine) -> None:
    """device_uid is a 2.25 UUID OID derived from the sha256: stable, and different for other bytes."""
    info = engine.model_info
    assert info.device_uid == device_uid(info.sha256)
    assert info.device_uid.startswith("2.25.") and len(info.device_uid) <= 64
    assert device_uid("0" * 64) != info.device_uid
    assert "CPUExecutionProvider" in engine.providers  # CI has no GPU; CUDA would come first when present
    assert engine.io_binding is (engine.providers[0] != "CPUExecutionProvider")


def test_manifest_cut_offs_are_ordered(engine: Engine) -> None:
    for cal in engine.manifest.calibration.values():
        assert 0 < cal.referral_threshold <= cal.high_risk_threshold < 1
        assert cal.temperature > 0


def test_d8_views_are_the_eight_symmetries_of_the_square() -> None:
    """The D8 view set yields 8 distinct views of an asymmetric image, each a rotation or mirror of it."""
    from inference.engine import D8_VIEWS
    x = np.arange(3 * 4 * 4, dtype=np.float32).reshape(1, 3, 4, 4)
    v = tta_batch(x, D8_VIEWS)
    assert v.shape == (8, 3, 4, 4)
    assert len({view.tobytes() for view in v}) == 8
    np.testing.assert_array_equal(v[0], x[0])
    np.testing.assert_array_equal(v[D8_VIEWS.index("rot90")], np.rot90(x[0], k=-1, axes=(1, 2)))
    np.testing.assert_array_equal(v[D8_VIEWS.index("rot270")], np.rot90(x[0], k=1, axes=(1, 2)))
