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
