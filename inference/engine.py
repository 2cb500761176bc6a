"""The inference engine: the committed ONNX model behind one small class.

    engine = Engine()                       # the model shipped in the ``models`` package
    preds = engine.predict([rgb_uint8, ...])

Flow for a batch: check input -> quality gate -> preprocess (``inference.preprocess``,
byte for byte what training used) -> ONNX Runtime (outputs ``logits`` and
``features``) -> calibrated softmax (temperature, malignancy bias), risk, uncertainty -> Grad-CAM.

On load the engine verifies the ONNX file's sha256 against the manifest, warms
the session up, and checks on that warm-up run that the manifest's classifier
weights reproduce the graph's logits from its feature map (so the Grad-CAM it
draws is the one of the served graph). Errors: see ``inference.errors``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog

from inference import postprocess as post
from inference.cam import grad_cam
from inference.errors import ImageDecodeError, InvalidInputError, ModelIntegrityError, ModelLoadError
from inference.ood import image_stats, load_for
from inference.preprocess import prepare
from inference.result import CLASSES, ModelInfo, Prediction, Risk

log = structlog.get_logger(__name__)

MODEL_FILE = "dermgate-lite0.onnx"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "input"
OUTPUT_LOGITS = "logits"
OUTPUT_FEATURES = "features"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = frozenset({CUDA, TENSORRT})
DEFAULT_PROVIDERS = (CUDA, CPU)
# Root for UUID-derived OIDs (ITU-T X.667 / PS3.5 B.2): 2.25.<uuid as integer>.
UUID_OID_ROOT = "2.25"
_DEVICE_UID_NAMESPACE = uuid.UUID("6f1c1c52-3d3f-5b0e-9a7e-6d65726d6761")  # fixed: dermgate models
# Test-time augmentation: the four flips of the square input; logits are averaged.
TTA_VIEWS = ("identity", "hflip", "vflip", "hvflip")
# The dihedral group of the square input: the 4 flips plus the 4 transposed views
# (90 and 270 degree rotations and the two diagonal mirrors). Dermoscopy has no
# up or down, so each is as plausible as the original.
D8_VIEWS = (*TTA_VIEWS, "transpose", "rot90", "rot270", "antitranspose")
_VIEW_FN = {
    "identity": lambda x: x,
    "hflip": lambda x: x[..., ::-1],
    "vflip": lambda x: x[..., ::-1, :],
    "hvflip": lambda x: x[..., ::-1, ::-1],
    "transpose": lambda x: x.swapaxes(-1, -2),
    "rot90": lambda x: x.swapaxes(-1, -2)[..., ::-1],
    "rot270": lambda x: x.swapaxes(-1, -2)[..., ::-1, :],
    "antitranspose": lambda x: x.swapaxes(-1, -2)[..., ::-1, ::-1],
}
# The flips as cv2.flip codes: cv2 flips a contiguous plane several times faster than a numpy
# copy through a reversed view (same values: a flip only moves them).
_CV2_FLIP = {"hflip": 1, "vflip": 0, "hvflip": -1}
# Host-side work per image (preprocessing, quality gate, image statistics, CAM) runs on a small
# thread pool (cv2 and numpy release the GIL) once a batch gives each thread this many images;
# below that the hand-off costs more than it saves.
MIN_IMAGES_PER_HOST_THREAD = 4
DEFAULT_HOST_THREADS = min(4, os.cpu_count() or 1)


def default_model_dir() -> Path:
    """Directory of the committed model: the ``models`` package itself."""
    return Path(str(resources.files("models")))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def device_uid(sha256: str) -> str:
    """A DICOM Device UID that changes exactly when the model bytes change (IHE AIR)."""
    return f"{UUID_OID_ROOT}.{uuid.uuid5(_DEVICE_UID_NAMESPACE, sha256.lower()).int}"


def _nvidia_gpu_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def select_providers(requested: Sequence[str] = DEFAULT_PROVIDERS) -> list[str]:
    """The requested providers that this ONNX Runtime build offers, in order.

    onnxruntime-gpu lists CUDA even on machines without a GPU (and then logs an
    error while falling back), so CUDA is kept only when an NVIDIA driver is there.
    CPU is always appended as the last resort."""
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available and (p not in GPU_PROVIDERS or _nvidia_gpu_present())]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


@dataclass(frozen=True)
class Manifest:
    """The parts of ``models/manifest.json`` the engine needs (the file has more)."""
    path: Path
    raw: dict
    onnx_file: str
    sha256: str
    name: str
    version: str
    manufacturer: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    colour_constancy: bool
    hair_removal: bool
    tta: bool
    calibration: dict[str, post.Calibration]   # "plain" and "tta"
    tta_views: tuple[str, ...]
    fc_weight: npt.NDArray[np.float32]          # (7, K)
    fc_bias: npt.NDArray[np.float32]            # (7,)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text())
            pp, cam = raw["preprocessing"], raw["cam"]
            if tuple(raw["classes"]) != CLASSES:
                raise ModelLoadError(f"manifest classes {raw['classes']} differ from {CLASSES}")
            w = cam["fc_weight"]
            weight = np.frombuffer(base64.b64decode(w["base64"]), dtype=np.dtype(w["dtype"]))
            weight = weight.reshape(w["shape"]).astype(np.float32)
            return cls(
                path=path, raw=raw, onnx_file=raw["onnx"]["file"], sha256=raw["onnx"]["sha256"],
                name=raw["name"], version=raw["version"], manufacturer=raw["manufacturer"],
                input_size=int(pp["input_size"]), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                colour_constancy=bool(pp["colour_constancy"]), hair_removal=bool(pp["hair_removal"]),
                tta=bool(raw["tta"]["enabled"]),
                tta_views=_check_views(raw["tta"].get("views", TTA_VIEWS)),
                calibration={k: post.Calibration.from_json(v) for k, v in raw["calibration"].items()},
                fc_weight=weight, fc_bias=np.asarray(cam["fc_bias"], np.float32))
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read model manifest {path}: {exc}") from exc


def load_image(path: Path | str) -> npt.NDArray[np.uint8]:
    """Decode a JPEG/PNG/BMP/TIFF/WebP file of any size and depth to RGB uint8."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc}") from exc
    return decode_image(data.tobytes(), name=str(path))


def decode_image(data: bytes, name: str = "image") -> npt.NDArray[np.uint8]:
    """Decode encoded image bytes to RGB uint8 (grey, 16-bit and RGBA are converted)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if bgr is None:
        raise ImageDecodeError(f"{name}: not a decodable image (corrupt, truncated or unsupported format)")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8)


def _check_views(views: Sequence[str]) -> tuple[str, ...]:
    views = tuple(views)
    if not views or views[0] != "identity" or set(views) - set(_VIEW_FN):
        raise ModelLoadError(f"TTA views {views} must start with 'identity' and come from {sorted(_VIEW_FN)}")
    return views


def tta_batch(x: npt.NDArray[np.float32], views: Sequence[str] = TTA_VIEWS) -> npt.NDArray[np.float32]:
    """Stack the TTA views of a preprocessed NCHW batch: (V*N, C, H, W), view-major,
    identity first (its features give the CAM). Each view is copied once into one array."""
    n = len(x)
    out = np.empty((len(views) * n, *x.shape[1:]), np.float32)
    for k, v in enumerate(views):
        np.copyto(out[k * n:(k + 1) * n], _VIEW_FN[v](x))
    return out


def fill_views(x: npt.NDArray[np.float32], i: int, n: int, views: Sequence[str]) -> None:
    """Write the views of image ``i`` (already at ``x[i]``, the identity) into its other slots of a
    view-major (V*N, C, H, W) batch: as ``tta_batch`` lays them out, without a second batch."""
    src = x[i]
    for k, v in enumerate(views[1:], start=1):
        dst = x[k * n + i]
        if v in _CV2_FLIP and src.flags.c_contiguous and dst.flags.c_contiguous:
            for c in range(len(src)):
                cv2.flip(src[c], _CV2_FLIP[v], dst=dst[c])
        else:
            np.copyto(dst, _VIEW_FN[v](src))


def merge_tta(logits: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    """Average the logits of the views of each image: (V*N, C) -> (N, C)."""
    return logits.reshape(-1, n, logits.shape[-1]).mean(axis=0)


class Engine:
    """Classifies dermoscopy images with the committed ONNX model."""

    def __init__(self, model_path: Path | str | None = None, *, manifest_path: Path | None = None,
                 intra_op_threads: int = 2, inter_op_threads: int = 1,
                 providers: Sequence[str] = DEFAULT_PROVIDERS, tta: bool | None = None,
                 batch_size: int = 32, warmup: bool = True, cpu_memory_arena: bool = True,
                 io_binding: bool | None = None, host_threads: int = DEFAULT_HOST_THREADS,
                 reuse_input_buffer: bool | None = None) -> None:
        """``model_path``: a folder holding ``manifest.json`` and the ONNX file it names, or
        the ONNX file itself (its manifest beside it); default: the model shipped in ``models``.

        ``cpu_memory_arena``: ONNX Runtime's CPU arena keeps the memory of the largest batch
        it ever ran for the life of the session (8 images x 4 TTA views: ~600 MB more RSS);
        a long-running service turns it off so that memory goes back after each batch.
        ``io_binding``: run through an ONNX Runtime IO binding (the input copied to the device
        once, outputs allocated by the provider); default: when a GPU provider runs the model.
        ``host_threads``: threads for the per-image host work of a batch (preprocessing, quality
        gate, statistics, CAM); on a GPU that work, not the model, bounds throughput. 1: none.
        ``reuse_input_buffer``: keep each calling thread's input batch (views included; 39 MB at
        32 images with TTA) between batches instead of allocating it anew, which costs page faults
        of ~0.25 ms per image; default: on with IO binding (the host-bound GPU path), off on the CPU."""
        path = Path(model_path) if model_path is not None else default_model_dir()
        model_dir = path.parent if path.suffix == ".onnx" else path
        self.manifest = Manifest.load(manifest_path or model_dir / MANIFEST_FILE)
        onnx_path = path if path.suffix == ".onnx" else model_dir / self.manifest.onnx_file
        if not onnx_path.is_file():
            raise ModelLoadError(f"model file {onnx_path} not found")
        digest = sha256_file(onnx_path)
        if digest != self.manifest.sha256:
            raise ModelIntegrityError(
                f"sha256 of {onnx_path.name} is {digest}, the manifest expects {self.manifest.sha256}: "
                "the model file was changed or replaced; refusing to load it")
        self.onnx_path = onnx_path
        self._intact_key: tuple[int, int, int] | None = None
        self._intact = False
        self.tta = self.manifest.tta if tta is None else tta
        self.calibration = self.manifest.calibration["tta" if self.tta else "plain"]
        self.batch_size = batch_size
        self.host_threads = max(1, host_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._model_info = ModelInfo(manufacturer=self.manifest.manufacturer, name=self.manifest.name,
                                     version=self.manifest.version, sha256=digest,
                                     device_uid=device_uid(digest))
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_cpu_mem_arena = cpu_memory_arena
        chosen = select_providers(providers)
        if chosen[0] == CPU:
            # The memory pattern pre-plans one buffer per input shape next to the arena: on the CPU
            # it nearly doubled the process (batch of 8 with TTA: +330 MB RSS) for ~3% speed.
            so.enable_mem_pattern = False
        try:
            self._session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=chosen)
        except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
            raise ModelLoadError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
        self.io_binding = (self.providers[0] in GPU_PROVIDERS) if io_binding is None else io_binding
        self.reuse_input_buffer = self.io_binding if reuse_input_buffer is None else reuse_input_buffer
        self._buffers = threading.local()
        outputs = {o.name for o in self._session.get_outputs()}
        if {OUTPUT_LOGITS, OUTPUT_FEATURES} - outputs or self._session.get_inputs()[0].name != INPUT_NAME:
            raise ModelLoadError(f"{onnx_path.name} lacks input '{INPUT_NAME}' or outputs "
                                 f"'{OUTPUT_LOGITS}'/'{OUTPUT_FEATURES}' (has {sorted(outputs)})")
        # Out-of-distribution statistics: a sidecar beside the manifest (models/ood_stats.py), used only
        # when it was made for exactly this ONNX file; without it results carry no OOD score.
        self.ood, why = load_for(model_dir, digest)
        if why:
            log.warning("inference.ood_disabled", reason=why)
        if warmup:
            self._warm_up()
        log.info("inference.engine_loaded", model=self.manifest.name, version=self.manifest.version,
                 sha256=digest[:12], providers=self.providers, tta=self.tta, threads=intra_op_threads)

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses (CUDA may have fallen back to CPU)."""
        return list(self._session.get_providers())

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    def file_intact(self) -> bool:
        """The model file on disk is still the one verified at load (readiness probes).

        Re-hashed only when its stat (inode, size, mtime) changes, so a probe every few
        seconds does not read 13 MB each time.
        """
        try:
            st = self.onnx_path.stat()
        except OSError:
            return False
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._intact_key != key:
            self._intact = sha256_file(self.onnx_path) == self._model_info.sha256
            self._intact_key = key
        return self._intact

    def _warm_up(self) -> None:
        """First run allocates memory and picks kernels; it also proves the manifest's
        fc weights are the graph's, since logits = mean-pooled features x W^T + b."""
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 3, self.manifest.input_size, self.manifest.input_size)).astype(np.float32)
        logits, feats = self.run(x)
        recomputed = feats.mean(axis=(2, 3)) @ self.manifest.fc_weight.T + self.manifest.fc_bias
        if not np.allclose(recomputed, logits, atol=1e-3, rtol=1e-3):
            raise ModelIntegrityError("the manifest's classifier weights do not reproduce the graph's "
                                      "logits: manifest and ONNX file do not belong together")

    def run(self, x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The bare graph on a preprocessed NCHW float32 batch: (logits, features)."""
        if self.io_binding:
            binding = self._session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(x, dtype=np.float32))
            binding.bind_output(OUTPUT_LOGITS)        # allocated where the provider computes them
            binding.bind_output(OUTPUT_FEATURES)
            self._session.run_with_iobinding(binding)
            logits, feats = binding.copy_outputs_to_cpu()
            return logits, feats
        logits, feats = self._session.run([OUTPUT_LOGITS, OUTPUT_FEATURES], {INPUT_NAME: x})
        return logits, feats

    def preprocess(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        m = self.manifest
        return prepare(image, m.input_size, colour_constancy=m.colour_constancy, hair_removal=m.hair_removal)

    def batch_tensor(self, images: Sequence[npt.NDArray[np.uint8]],
                     host_threads: int | None = None) -> npt.NDArray[np.float32]:
        """The model input for ``images``: preprocessed, with the TTA views when enabled,
        exactly ``tta_batch(np.stack([preprocess(im) ...]))``."""
        x, fill = self._batch_filler(images)
        self._host_map(fill, len(images), host_threads)
        return x

    def _batch_filler(self, images: Sequence[npt.NDArray[np.uint8]], reuse: bool = False
                      ) -> tuple[npt.NDArray[np.float32], Callable[[int], None]]:
        """An empty (V*N, 3, S, S) batch and the function that fills image i's slots in place;
        with ``reuse``, the front of this thread's kept buffer (valid until its next batch)."""
        m, n = self.manifest, len(images)
        views = m.tta_views if self.tta else ("identity",)
        shape = (len(views) * n, 3, m.input_size, m.input_size)
        if reuse:
            kept: npt.NDArray[np.float32] | None = getattr(self._buffers, "x", None)
            if kept is None or len(kept) < shape[0]:
                kept = np.empty((len(views) * max(n, self.batch_size), *shape[1:]), np.float32)
                self._buffers.x = kept
            x = kept[:shape[0]]
        else:
            x = np.empty(shape, np.float32)

        def fill(i: int) -> None:
            prepare(images[i], m.input_size, colour_constancy=m.colour_constancy,
                    hair_removal=m.hair_removal, out=x[i])
            fill_views(x, i, n, views)
        return x, fill

    def _host_map(self, fn: Callable[[int], object], n: int, host_threads: int | None = None) -> list:
        """``[fn(i) for i in range(n)]``, on the host pool in contiguous chunks when the batch is large."""
        workers = min(self.host_threads if host_threads is None else host_threads, n // MIN_IMAGES_PER_HOST_THREAD)
        if workers <= 1:
            return [fn(i) for i in range(n)]
        bounds = np.linspace(0, n, workers + 1).astype(int)
        pool = self._host_pool(workers)
        chunks = [pool.submit(lambda a, b: [fn(i) for i in range(a, b)], int(a), int(b))
                  for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [r for c in chunks for r in c.result()]

    def _host_pool(self, workers: int) -> ThreadPoolExecutor:
        """The host thread pool, made on first use and again in a forked child (whose copy
        of the parent's pool has no threads)."""
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid() or self._pool._max_workers < workers:
                if self._pool is not None and self._pool_pid == os.getpid():
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max(workers, self.host_threads), thread_name_prefix="dermgate-host")
                self._pool_pid = os.getpid()
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool

    def logits(self, x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Logits (TTA-averaged when enabled) and the identity view's features for a batch."""
        if not self.tta:
            return self.run(x)
        logits, feats = self.run(tta_batch(x, self.manifest.tta_views))
        return merge_tta(logits, len(x)), feats[: len(x)]

    def predict(self, images: Sequence[npt.NDArray[np.uint8]], *, cam: bool = True) -> list[Prediction]:
        """Classify RGB uint8 images (any size); one Prediction each, in order.

        Raises InvalidInputError (naming the index) for anything that is not an
        HxWx3 uint8 array. Images that fail the quality gate still get model
        probabilities (for evaluation), but ``assessable=False``, risk
        NOT_ASSESSABLE, a reason, and no CAM: they must not be shown as a result."""
        for i, img in enumerate(images):
            try:
                post.check_image(img)
            except InvalidInputError as exc:
                raise InvalidInputError(f"image {i}: {exc}") from None
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._predict_batch(images[start:start + self.batch_size], cam))
        return out

    def _predict_batch(self, images: Sequence[npt.NDArray[np.uint8]], want_cam: bool) -> list[Prediction]:
        n = len(images)
        x, fill = self._batch_filler(images, reuse=self.reuse_input_buffer)

        def host(i: int) -> tuple[str | None, dict[str, float]]:
            fill(i)
            return post.assess(images[i]), image_stats(images[i])
        checked = self._host_map(host, n)
        logits, feats = self.run(x)
        if self.tta:
            logits, feats = merge_tta(logits, n), feats[:n]
        cal = self.calibration
        probs = cal.probabilities(logits)
        p_mal = post.malignancy(probs)
        unc = post.normalised_entropy(probs)
        ood = self.ood.score(feats.mean(axis=(2, 3))) if self.ood is not None else None
        tops = probs.argmax(axis=1)

        def cam_of(i: int) -> npt.NDArray[np.float32] | None:
            return (grad_cam(feats[i], self.manifest.fc_weight, int(tops[i]), images[i].shape[:2])
                    if want_cam and checked[i][0] is None else None)
        cams = self._host_map(cam_of, n) if want_cam else [None] * n
        preds = []
        for i, (reason, stats) in enumerate(checked):
            preds.append(Prediction(
                probabilities={c: float(probs[i, k]) for k, c in enumerate(CLASSES)},
                malignancy_probability=float(p_mal[i]),
                risk=Risk.NOT_ASSESSABLE if reason else post.risk_level(float(p_mal[i]), cal),
                uncertainty=float(unc[i]),
                low_confidence=bool(unc[i] >= cal.low_confidence_threshold),
                assessable=reason is None, reason=reason, model=self._model_info, cam=cams[i],
                ood_score=float(ood[i]) if ood is not None else None,
                out_of_distribution=bool(ood is not None and ood[i] > self.ood.threshold),   # type: ignore[union-attr]
                image_stats=stats))
        return preds
