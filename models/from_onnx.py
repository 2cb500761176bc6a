"""Recover trainable torch members from a shipped ONNX model (warm start).

The checkpoints of a shipped model are not committed (about 40 MB each), but its
ONNX file is. ``torch.onnx.export`` folded every BatchNorm into the conv before it,
so each conv's folded weight and bias are written back into an EfficientNet-Lite
whose BatchNorms are made identities (mean 0, variance 1 - eps, scale 1, shift =
the folded bias). The result computes exactly what the ONNX graph computes; it must
then be fine-tuned with its BatchNorms in eval mode (``[train] freeze_bn``), since
batch statistics would undo the folding.

    from models.from_onnx import members_from_onnx
    nets = members_from_onnx("models/dermgate-lite0.onnx", "efficientnet-lite0", n_members=2, dropout=0.3)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.engine import INPUT_NAME, OUTPUT_LOGITS

FC_WEIGHT, FC_BIAS = "net._fc.weight", "net._fc.bias"


def _execution_order(net: nn.Module, size: int) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, the BatchNorm that follows it) in the order forward runs them."""
    seen: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: seen.append(mod))
             for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    net.eval()
    with torch.no_grad():
        net.extract_features(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    pairs = []
    for a, b in zip(seen[::2], seen[1::2]):
        if not (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)):
            raise ValueError("expected every conv to be followed by its BatchNorm")
        pairs.append((a, b))
    return pairs


def members_from_onnx(onnx_path: Path | str, arch: str, n_members: int, dropout: float,
                      size: int = 160) -> list[nn.Module]:
    """The ``n_members`` networks of a ``MeanEnsemble`` export (1 for a single model)."""
    import onnx
    from onnx import numpy_helper

    from models.arch import build_model
    graph = onnx.load(str(onnx_path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [(init[n.input[1]], init[n.input[2]]) for n in graph.node if n.op_type == "Conv"]
    members = [build_model(arch, dropout) for _ in range(n_members)]
    pairs = [p for m in members for p in _execution_order(m, size)]
    if len(pairs) != len(convs):
        raise ValueError(f"{onnx_path}: {len(convs)} convs in the graph, {len(pairs)} in {n_members} x {arch}")
    with torch.no_grad():
        for (conv, bn), (w, b) in zip(pairs, convs):
            if tuple(conv.weight.shape) != w.shape:
                raise ValueError(f"shape mismatch {tuple(conv.weight.shape)} vs {w.shape}")
            conv.weight.copy_(torch.from_numpy(w))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        # The stacked head holds each member's weights divided by the member count; its
        # bias is the members' mean bias, which each member takes whole: a member's logits
        # are then its original ones shifted by a constant per class (the mean is exact).
        fw, fb = init[FC_WEIGHT], init[FC_BIAS]
        k = fw.shape[1] // n_members
        for i, m in enumerate(members):
            m._fc.weight.copy_(torch.from_numpy(fw[:, i * k:(i + 1) * k] * n_members))
            m._fc.bias.copy_(torch.from_numpy(fb))
    return [m.eval() for m in members]


def check_against_onnx(onnx_path: Path | str, members: list[nn.Module], x: np.ndarray) -> float:
    """Max |logit difference| between the members' mean and the ONNX graph on ``x``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run([OUTPUT_LOGITS], {INPUT_NAME: x})[0]
    with torch.no_grad():
        got = torch.stack([m(torch.from_numpy(x)) for m in members]).mean(0).numpy()
    return float(np.abs(ref - got).max())
