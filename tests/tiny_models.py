"""A tiny model importable as ``tiny_models:TinyNet`` (tests' package.module:callable path)."""

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
