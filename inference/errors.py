"""Errors raised by the inference package.

    InferenceError
     ├── ModelLoadError            the model or its manifest cannot be loaded
     │    └── ModelIntegrityError  the ONNX file's sha256 differs from the manifest,
     │                             or the manifest's CAM weights disagree with the graph
     └── InvalidInputError         the caller passed something that is not an RGB uint8 image
          └── ImageDecodeError     bytes on disk that no codec can read (corrupt / not an image)

Images that decode but are not dermoscopy-like (tiny, blank, non-skin) are not
errors: the engine answers them with ``Risk.NOT_ASSESSABLE`` and a reason.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error the inference package raises on purpose."""


class ModelLoadError(InferenceError):
    """The ONNX model or its manifest is missing, unreadable or inconsistent."""


class ModelIntegrityError(ModelLoadError):
    """The model on disk is not the one the manifest describes."""


class InvalidInputError(InferenceError, ValueError):
    """The input is not an HxWx3 uint8 RGB image (wrong type, dtype, shape or empty)."""


class ImageDecodeError(InvalidInputError):
    """A file could not be decoded as an image (corrupt, truncated or another format)."""
