"""The pipeline's DICOM edge: what the Worker is given to read, decode and render DICOM.

The core (dermgate/pipeline.py) knows neither pydicom nor the output writers; the
composition root (dermgate/app.py) injects these two, as it injects the classifier.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from dermgate.durable import Deferred
from dermgate.records import ImageRef, Outputs
from dermgate.store import ObjectStore
from inference.result import Prediction
from integration.dicom_scp.decode import decode_rgb
from integration.dicom_scp.outputs import write_outputs


class DicomDecoder:
    """Parses a stored DICOM object and decodes its pixels to RGB (``Decoder`` in the pipeline)."""

    def read(self, data: bytes) -> Dataset:
        return dcmread(BytesIO(data))

    def image_ref(self, ref: ImageRef, source: Dataset) -> ImageRef:
        from integration.dicom_scp.context import with_context
        return with_context(ref, source)

    def rgb(self, source: Dataset) -> np.ndarray:
        return decode_rgb(source)


class DicomRenderer:
    """Writes the Grad-CAM Secondary Capture, the AI-result SR and the heatmap PNG (``Renderer``)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store          # every file goes through it: encrypted at rest when configured

    def render(self, source: Dataset, prediction: Prediction, folder: Path,
               image_rgb: np.ndarray | None) -> tuple[Outputs, tuple[Deferred, ...]]:
        written = write_outputs(source, prediction, folder, image_rgb=image_rgb, files=self.store, sync=False)
        return written.to_record(self.store.root), written.pending
