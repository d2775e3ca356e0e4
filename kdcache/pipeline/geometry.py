"""One sampled geometric transform (scale, crop window, flip, aspect) and its packed form.

The augmentation (:mod:`kdcache.pipeline.transforms`) draws a :class:`Geometry` per item and applies it;
the store (:mod:`kdcache.store.schema`) keeps stored views' geometries packed as the numbers of
:attr:`Geometry.PACKED`. Both use this module, so the file format does not depend on the
augmentation code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """One sampled transform of an image of ``in_size`` (H, W), in input-pixel units:
    scale by ``scale`` (the width by ``scale · stretch``: a random-resized crop changes the
    aspect ratio), take the ``out_size`` window whose top-left corner is ``(top, left)`` in the
    scaled image (it may stick out: padded), then mirror if ``flip``."""

    in_size: tuple[int, int]
    scale: float
    top: int
    left: int
    out_size: tuple[int, int]
    flip: bool
    stretch: float = 1.0

    #: the fields :meth:`pack` writes, in order (the input size is the image's, known on
    #: unpacking); stores written before ``stretch`` existed hold the first six
    PACKED = ("scale", "top", "left", "out_h", "out_w", "flip", "stretch")

    @property
    def scaled_size(self) -> tuple[int, int]:
        return (max(1, round(self.in_size[0] * self.scale)),
                max(1, round(self.in_size[1] * self.scale * self.stretch)))

    def box(self) -> tuple[float, float, float, float]:
        """The crop as a box of the input image: (top, left, height, width) in input pixels
        (before the flip; it may stick out of the image where the crop is padded)."""
        sh, sw = self.scaled_size
        fy, fx = self.in_size[0] / sh, self.in_size[1] / sw
        return self.top * fy, self.left * fx, self.out_size[0] * fy, self.out_size[1] * fx

    def pack(self) -> list[float]:
        """The transform as the numbers of :attr:`PACKED` (how a cache stores its views)."""
        return [self.scale, self.top, self.left, self.out_size[0], self.out_size[1], float(self.flip), self.stretch]

    @classmethod
    def identity(cls, in_size: tuple[int, int]) -> Geometry:
        """No transform: scale 1, the whole image, no flip."""
        return cls(tuple(in_size), 1.0, 0, 0, tuple(in_size), False)

    @classmethod
    def unpack(cls, in_size: tuple[int, int], row) -> Geometry:
        """The inverse of :meth:`pack` for an image of ``in_size``."""
        scale, top, left, oh, ow, flip, *rest = (float(v) for v in row)
        stretch = rest[0] if rest and math.isfinite(rest[0]) else 1.0
        return cls(tuple(in_size), scale, int(top), int(left), (int(oh), int(ow)), bool(flip), stretch)
