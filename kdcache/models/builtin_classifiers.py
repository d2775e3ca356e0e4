"""The built-in classifier pair, sized for distillation demos on a CPU (``demo_cls_teacher``,
``demo_cls_student``).

Both take ImageNet-normalised RGB ``[N, 3, H, W]`` of any size and return logits ``[N, C]``:
convolutional stages, a global average pool (``pool``) and a linear classifier (``fc``), the
layout of torchvision's ResNets, so the class map before pooling (ReLabel's label map) is
``fc`` applied at every cell of ``stage3``. Feature taps: ``stem``, ``stage1``, ``stage2``,
``stage3`` (4-D maps).

* :func:`demo_cls_teacher` (~0.70M parameters at width 32): a ResNet-like network, two basic
  blocks per stage, strides 1, 2, 4 (a 32 x 32 image ends as an 8 x 8 map).
* :func:`demo_cls_student` (~47k parameters at width 16): one 3 x 3 conv-BN-ReLU per stage,
  strides 2, 4, 8, 8, so a 32 x 32 image ends as a 4 x 4 map; about 7 % of the teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcache.models.builtin import BasicBlock, conv_bn_relu
from kdcache.models.registry import register_model

SOURCE = "built-in classifiers (kdcache)"
TASK = "classification"


class BuiltinClassifier(nn.Module):
    def __init__(self, stem: nn.Module, stage1: nn.Module, stage2: nn.Module, stage3: nn.Module, channels: int,
                 num_classes: int):
        super().__init__()
        self.stem, self.stage1, self.stage2, self.stage3 = stem, stage1, stage2, stage3
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def demo_cls_teacher(num_classes: int, width: int = 32) -> nn.Module:
    """The demo classification teacher (~0.70M parameters at width 32); see the module docstring."""
    w = width
    return BuiltinClassifier(
        conv_bn_relu(3, w),
        nn.Sequential(BasicBlock(w, w), BasicBlock(w, w)),
        nn.Sequential(BasicBlock(w, 2 * w, stride=2), BasicBlock(2 * w, 2 * w)),
        nn.Sequential(BasicBlock(2 * w, 4 * w, stride=2), BasicBlock(4 * w, 4 * w)),
        4 * w, num_classes)


@register_model
def demo_cls_student(num_classes: int, width: int = 16) -> nn.Module:
    """The demo classification student (~47k parameters at width 16); see the module docstring."""
    w = width
    return BuiltinClassifier(
        conv_bn_relu(3, w, stride=2),
        conv_bn_relu(w, 2 * w, stride=2),
        conv_bn_relu(2 * w, 3 * w, stride=2),
        conv_bn_relu(3 * w, 4 * w),
        4 * w, num_classes)


for _fn in (demo_cls_teacher, demo_cls_student):
    _fn.TASK = TASK
