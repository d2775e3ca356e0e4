"""A tiny model importable as ``tiny_models:TinyNet`` (tests' package.module:callable path)."""

from types import SimpleNamespace

import torch
from torch import nn


class TinyNet(nn.Module):
    """Stride-2 conv net returning a dict like torchvision's models do."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return {"out": self.head(self.body(x))}


def not_a_module(num_classes: int):
    return "nope"


class NaNForBrightImages(nn.Module):
    """Stride-2 logits that are NaN for every image whose mean (after normalisation) is above
    ``threshold``: a teacher that breaks on some inputs only."""

    def __init__(self, num_classes: int, threshold: float = 0.0):
        super().__init__()
        self.threshold = threshold
        self.body = nn.Conv2d(3, num_classes, 3, stride=2, padding=1)

    def forward(self, x):
        out = self.body(x)
        bright = x.mean((1, 2, 3)) > self.threshold
        return out.masked_fill(bright.view(-1, 1, 1, 1), float("nan"))


class NaNLogits(TinyNet):
    """TinyNet whose logits are NaN for every image, its weights finite: a forward that breaks."""

    def forward(self, x):
        return {"out": super().forward(x)["out"] * float("nan")}


class NoTensorOutput(TinyNet):
    """Returns a dict without a tensor in it: kdcache cannot find its logits."""

    def forward(self, x):
        return {"aux": None}


class WrongClassCount(TinyNet):
    """Predicts one class more than it was asked for."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes + 1)


class FlatLogits(TinyNet):
    """Returns [N, C] (image-level) logits: not a segmentation model."""

    def forward(self, x):
        return self.head(self.body(x)).mean((2, 3))


class LogitsAttribute(TinyNet):
    """Returns an object with a ``logits`` attribute, as transformers' models do."""

    def forward(self, x):
        return SimpleNamespace(loss=None, logits=self.head(self.body(x)))


class SpareModule(TinyNet):
    """Has a module (``spare``) its forward never calls: tapping it yields nothing."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.spare = nn.Conv2d(8, 8, 1)


class HugeLogits(TinyNet):
    """Logits far beyond fp16's range (±65504)."""

    def forward(self, x):
        return {"out": super().forward(x)["out"] * 0 + 1e6}


class _Huge(nn.Module):
    def forward(self, x):
        return x * 0 + 1e6


class HugeFeatures(TinyNet):
    """Ordinary logits, but the output of its module ``big`` exceeds fp16's range."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.big = _Huge()

    def forward(self, x):
        return {"out": self.head(self.big(self.body(x)) * 1e-6)}


class BatchDependent(TinyNet):
    """Logits scaled by 2 unless the batch holds 2 images: a forward that branches on its input,
    which a traced export follows only for the example's batch size."""

    def forward(self, x):
        out = self.head(self.body(x))
        return {"out": out if x.shape[0] == 2 else 2 * out}


class NoOnnxOperator(TinyNet):
    """Uses an operator (Bessel's i0) that ONNX has no form of: the ONNX exporter refuses it."""

    def forward(self, x):
        return {"out": torch.special.i0(self.head(self.body(x)))}


class OneClass(nn.Module):
    """Predicts class ``cls`` at every pixel, whatever the image (stride-2 logits, 10 for ``cls`` and 0
    for the others, times one trainable scale that keeps an optimiser busy): its per-class IoU follows
    from the labels alone, an independent reference for compare's tables."""

    def __init__(self, num_classes: int, cls: int = 0):
        super().__init__()
        self.num_classes, self.cls = num_classes, cls
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2,
                             device=x.device)
        logits[:, self.cls] = 10.0
        return {"out": logits * self.scale.abs()}
