"""The built-in teacher/student pair, sized for knowledge-distillation demos on a CPU.

Both networks take ImageNet-normalised RGB ``[N, 3, H, W]`` and return logits
``[N, num_classes, ceil(H / 4), ceil(W / 4)]`` (native output stride 4; the caller upsamples
to the label size). Every spatial down-sampling is a stride-2 convolution with "same" padding,
so any input size works and each stage has ``ceil(size / stride)`` rows and columns.

Both share one layout of named parts, so knowledge-distillation methods can tap the same
places with forward hooks (every tap is a 4-D ``[N, C, h, w]`` feature map):

============  ======  ========================  ====================  ========================
part          stride  teacher channels          student channels      compact student channels
============  ======  ========================  ====================  ========================
``stem``      4       48                        24                    24
``stage1``    4       64                        36                    32
``stage2``    8       128                       48                    64
``stage3``    8       128 (dilated, + context)  72 (1x1 conv)         64 (dilated, + context)
``head``      4       num_classes               num_classes           num_classes
============  ======  ========================  ====================  ========================

The **teacher** (:func:`demo_teacher`, ~1.7M parameters) is a small DeepLabv3+-like network:
residual stages, a dilated stage at stride 8 (dilations 2 and 4) followed by an ASPP-style
context module (1x1, dilated 3x3 at rates 2/4/6 and image pooling) so that its receptive
field covers the whole image, and a decoder that fuses the context features with the
stride-4 ``stage1`` features for sharp boundaries and thin objects.

The **student** (:func:`demo_student`, ~39k parameters) has the same stage layout but is
narrow and shallow: one plain conv-BN-ReLU per stage, only four 3x3 convolutions in all (the
stem's two, ``stage1`` and the stride-2 ``stage2``; ``stage3`` and the head's fusion are 1x1),
no dilation, no context module. Its receptive field is about 31 px, against the teacher's
whole image, and it has ~2% of the teacher's parameters: a local, low-capacity model of the
kind distillation is meant to help, but an ordinary, trainable segmentation network.

The **compact student** (:func:`compact_student`, ~0.25M parameters, about a seventh of the
teacher) is the teacher's own design made smaller, as DeepLabV3-ResNet18 is DeepLabV3-ResNet101
made smaller in the pairs the segmentation-distillation literature reports: the same residual
stages, dilated stage, context module and fusing decoder, at half the width with one block per
stage. It is the realistic pair for benchmarks; ``demo_student`` stays the demo's (its teacher
knows far more than it can hold).

Their mIoU and training times on the built-in synthetic data with ``train-teacher``'s defaults
are in benchmarks/results/teacher-student-gap-cpu.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.core.errors import ModelError
from kdcache.models.registry import register_model

__all__ = ["BuiltinSegNet", "compact_student", "demo_student", "demo_teacher"]
SOURCE = "built-in (kdcache)"


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """A ResNet basic block (two 3x3 conv-BN, identity or 1x1 projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.short is None else self.short(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + idt, inplace=True)


class ContextModule(nn.Module):
    """ASPP-lite: parallel 1x1, dilated 3x3 branches and image pooling, fused by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (2, 4, 6), branch: int = 64):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, branch, 1)] + [conv_bn_relu(cin, branch, 3, dilation=r) for r in rates]
        )
        # no BatchNorm on the 1x1 pooled map: it would fail on a training batch of one
        self.pool = nn.Sequential(nn.Conv2d(cin, branch, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(branch * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        g = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs.append(g.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, 1))


class BuiltinSegNet(nn.Module):
    """stem -> stage1 (stride 4) -> stage2 -> stage3 (stride 8) -> head (stride-4 logits).

    The head upsamples ``stage3`` to the size of ``stage1`` and fuses the two, so the logits
    come out at stride 4 (``ceil(H/4) x ceil(W/4)``) for any input size.
    """

    def __init__(self, stem: nn.Module, stage1: nn.Module, stage2: nn.Module, stage3: nn.Module,
                 head: nn.Module, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.stem = stem
        self.stage1 = stage1
        self.stage2 = stage2
        self.stage3 = stage3
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        low = self.stage1(x)
        x = self.stage3(self.stage2(low))
        return self.head(low, x)


class FuseHead(nn.Module):
    """Decoder: 1x1-reduce the stride-4 features, upsample the stride-8 ones, fuse, classify."""

    def __init__(self, c_low: int, c_high: int, c_skip: int, c_mid: int, num_classes: int,
                 n_convs: int = 1, fuse_kernel: int = 3):
        super().__init__()
        self.skip = conv_bn_relu(c_low, c_skip, 1)
        layers = [conv_bn_relu(c_high + c_skip, c_mid, fuse_kernel)]
        layers += [conv_bn_relu(c_mid, c_mid, fuse_kernel) for _ in range(n_convs - 1)]
        self.fuse = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c_mid, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([self.skip(low), high], 1)))


def _width(model: str, width, least: int) -> int:
    """A built-in model's ``width`` option (``--model-option width=N``): a whole number of at least
    ``least`` (its narrowest layer has ``width // least`` channels)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < least:
        raise ModelError(f"{model}'s width must be a whole number of at least {least}, got {width!r}")
    return width


@register_model
def demo_teacher(num_classes: int, width: int = 64) -> nn.Module:
    """The demo teacher (~1.7M parameters at the default width): see the module docstring."""
    w = _width("demo_teacher", width, 2)
    stem = nn.Sequential(conv_bn_relu(3, w // 2, stride=2), conv_bn_relu(w // 2, w * 3 // 4, stride=2))
    stage1 = nn.Sequential(BasicBlock(w * 3 // 4, w), BasicBlock(w, w))
    stage2 = nn.Sequential(BasicBlock(w, 2 * w, stride=2), BasicBlock(2 * w, 2 * w))
    stage3 = nn.Sequential(
        BasicBlock(2 * w, 2 * w, dilation=2),
        BasicBlock(2 * w, 2 * w, dilation=4),
        ContextModule(2 * w, 2 * w, rates=(2, 4, 6), branch=w),
    )
    head = FuseHead(w, 2 * w, w // 2, w, num_classes, n_convs=2)
    return BuiltinSegNet(stem, stage1, stage2, stage3, head, num_classes)


@register_model
def demo_student(num_classes: int, width: int = 24) -> nn.Module:
    """The demo student (~39k parameters at the default width): see the module docstring."""
    w = _width("demo_student", width, 1)
    stem = nn.Sequential(conv_bn_relu(3, w, stride=2), conv_bn_relu(w, w, stride=2))
    stage1 = conv_bn_relu(w, w * 3 // 2)
    stage2 = conv_bn_relu(w * 3 // 2, 2 * w, stride=2)
    stage3 = conv_bn_relu(2 * w, 3 * w, k=1)
    head = FuseHead(w * 3 // 2, 3 * w, w, 2 * w, num_classes, fuse_kernel=1)
    return BuiltinSegNet(stem, stage1, stage2, stage3, head, num_classes)


@register_model
def compact_student(num_classes: int, width: int = 32) -> nn.Module:
    """The compact student (~0.25M parameters at the default width): the teacher's design at half
    its width and one block per stage; see the module docstring."""
    w = _width("compact_student", width, 2)
    stem = nn.Sequential(conv_bn_relu(3, w // 2, stride=2), conv_bn_relu(w // 2, w * 3 // 4, stride=2))
    stage1 = BasicBlock(w * 3 // 4, w)
    stage2 = BasicBlock(w, 2 * w, stride=2)
    stage3 = nn.Sequential(BasicBlock(2 * w, 2 * w, dilation=2), ContextModule(2 * w, 2 * w, rates=(2, 4, 6), branch=w))
    head = FuseHead(w, 2 * w, w // 2, w, num_classes, n_convs=1)
    return BuiltinSegNet(stem, stage1, stage2, stage3, head, num_classes)
