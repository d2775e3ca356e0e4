"""Teacher signals: the kinds of map a cache stores per teacher tap beside the logits.

A signal is one class registered in :data:`SIGNALS` under its kind (``features``, ``attention``, …),
which is also its group in the store (``<kind>/<tap>/values``, ``views/<kind>/<tap>/values``), its
key in a read sample (``<kind>/<tap>``), its key in a training batch (``kd/<kind>/<tap>``, with
``kd/<kind>/<tap>/ignore``) and its entry in the store's attributes (``<kind>: {tap: {…}}``). The
class owns what differs between kinds: what is stored of the teacher's feature (:meth:`Signal.encode`),
the per-sample shape that gives (:meth:`Signal.shape`), and how a crop takes it
(:meth:`Signal.take`, nearest cell by default). The schema, the writer, the reader, the online
teacher and the geometry code ask the registry; none of them names a kind. A new signal is one
class::

    @SIGNALS.register("energy")
    class Energy(Signal):
        channels = False
        def encode(self, feature):
            return feature.float().abs().mean(1)

and ``build-teacher-cache --features TAP --signals energy`` stores it.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.core.registry import Registry
from kdcache.core.topk import attention_map


class Signal:
    """A map the teacher gives per tap (see the module docstring). ``channels``: whether the
    stored map keeps the feature's channel axis ([c, h, w]) or is one map per sample ([h, w])."""

    name = ""
    channels = True

    def encode(self, feature: torch.Tensor) -> torch.Tensor:
        """The stored map of a batch of the tap's outputs ``feature`` [B, c, h, w] (float32; the
        store keeps it as float16)."""
        return feature

    def shape(self, channels: int, map_size: tuple[int, int]) -> tuple[int, ...]:
        """One sample's stored shape for a tap of ``channels`` channels and ``map_size``."""
        return (channels, *map_size) if self.channels else tuple(map_size)

    def meta(self, channels: int, map_size: tuple[int, int]) -> dict:
        """What the store's attributes record of one tap (its stride is added by the schema)."""
        return {"channels": int(channels), "map_size": list(map_size)} if self.channels \
            else {"map_size": list(map_size)}

    def describe(self, tap: str, info: dict) -> str:
        """The tap as ``inspect-cache`` lists it."""
        shape = self.shape(info.get("channels", 1), tuple(info["map_size"]))
        return f"{tap} ({'x'.join(str(s) for s in shape)})"

    def take(self, x: torch.Tensor, cells: np.ndarray, out_hw: tuple[int, int]) -> torch.Tensor:
        """``x`` [..., h, w] (on the CPU) at the flat map positions ``cells`` of a crop's output
        grid (nearest cell): [..., out_h, out_w]."""
        return take_cells(x, cells, out_hw)


def take_cells(x: torch.Tensor, cells: np.ndarray, out_hw: tuple[int, int]) -> torch.Tensor:
    """``x`` [..., h, w] (on the CPU) sampled at the flat positions ``cells`` (``row × w + col``):
    [..., out_h, out_w]. One ``np.take`` along the flattened map: on maps this small it is several
    times faster than numpy's fancy indexing (itself several times faster than torch's gather), and
    one index serves every array of a map group."""
    a = x.numpy()
    lead = a.shape[:-2]
    out = np.take(a.reshape(*lead, a.shape[-2] * a.shape[-1]), cells, axis=-1)
    return torch.from_numpy(out.reshape(*lead, *out_hw))


SIGNALS: Registry[type[Signal]] = Registry("teacher signal")


@SIGNALS.register("features")
class Features(Signal):
    """The tap's output itself (FitNets, CWD on features, …)."""


@SIGNALS.register("attention")
class Attention(Signal):
    """The attention-transfer map Σ_c F_c², L2-normalised per sample (Zagoruyko & Komodakis):
    one channel, so a method that needs only it reads a fraction of the features' bytes."""

    channels = False

    def encode(self, feature: torch.Tensor) -> torch.Tensor:
        return attention_map(feature)


def signal(kind: str) -> Signal:
    """The registered signal ``kind``, as an instance."""
    return SIGNALS.get(kind)()


def signal_kinds() -> list[str]:
    """Every registered kind, ``features`` and ``attention`` first (the order of the store's arrays)."""
    rest = [k for k in SIGNALS.names() if k not in ("features", "attention")]
    return ["features", "attention", *rest]


def signal_of(key: str) -> Signal | None:
    """The signal of a base map's key in a read sample (``features/x``, ``attention/y``), or None
    (logits, extents, views)."""
    kind, _, tap = key.partition("/")
    return signal(kind) if tap and kind in SIGNALS else None
