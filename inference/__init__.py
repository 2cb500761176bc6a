"""Inference: preprocessing, the ONNX Runtime engine, Grad-CAM and post-processing."""
