"""The case page's pictures: the received image, and the Grad-CAM overlay aligned with it.

The received image is served as the dermatoscope sent it when it is 8-bit colour JPEG (the
encapsulated frame is a JPEG file); anything else is decoded and sent as PNG. The worker's
heatmap PNG is the image blended with the CAM above a legend panel, upscaled to at least
``MIN_WIDTH`` pixels wide; its image part, cut off the legend, lies exactly over the received
image, so the page can fade it in and out with an opacity control.
"""

from __future__ import annotations

from io import BytesIO

import cv2
import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

from dermgate.store import ObjectStore
from integration.dicom_scp.render import MIN_WIDTH


def received_image(store: ObjectStore, path: str) -> tuple[bytes, str]:
    """(bytes, media type) of the first frame of the stored object."""
    ds = pydicom.dcmread(BytesIO(store.read(path)))
    ts = ds.file_meta.TransferSyntaxUID
    if ts in (JPEGBaseline8Bit, JPEGExtended12Bit) and int(ds.get("BitsAllocated", 8)) == 8:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return get_frame(ds.PixelData, 0, number_of_frames=frames), "image/jpeg"
    from integration.dicom_scp.decode import decode_rgb
    rgb = decode_rgb(ds)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode the image as PNG")
    return png.tobytes(), "image/png"


def heatmap_overlay(store: ObjectStore, path: str, heatmap_png: bytes) -> bytes:
    """The heatmap PNG's image part (the legend cut off), same aspect as the received image."""
    ds = pydicom.dcmread(store.path(path), stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    rows, cols = int(ds.Rows), int(ds.Columns)
    img = cv2.imdecode(np.frombuffer(heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return heatmap_png
    width = img.shape[1]
    height = rows if cols >= MIN_WIDTH else max(1, round(rows * MIN_WIDTH / cols))
    if width != max(cols, MIN_WIDTH) or height > img.shape[0]:
        return heatmap_png                     # not the layout we know: show it whole
    ok, png = cv2.imencode(".png", img[:height])
    return png.tobytes() if ok else heatmap_png
