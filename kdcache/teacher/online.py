"""``train-student --online-teacher``: a live teacher run every step instead of the cache,
feeding the same loss code. For parity checks and benchmarks only: it costs the teacher forward
per step that the cache exists to avoid.

The teacher may be the ensemble / test-time-augmented teacher a cache records
(:meth:`OnlineTeacher.from_cache`), run the same way (slowly), so that its targets can be
checked against the cached ones. The teacher's outputs on the student's (already transformed)
batch become the same ``kd/…`` targets the cache pipeline gives: top-k values and ids rounded through fp16 as the cache
stores them, the tail, features and attention maps, and the crop's padding marked ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdcache.core.topk import topk_targets
from kdcache.models.loading import open_weights
from kdcache.pipeline.mixing import mixed_padding
from kdcache.pipeline.signals import signal, signal_kinds
from kdcache.pipeline.transforms import Preprocess
from kdcache.pipeline.warp import out_map_size, sample_grid
from kdcache.store.schema import CacheSchema
from kdcache.teacher.ensemble import EnsemblePlan, Member, TeacherEnsemble, from_record

_PROBE = (64, 64)


class OnlineTeacher:
    """The teacher ``arch`` with ``weights``, tapping ``taps``; ``k`` top logits per position
    (None: all classes, a dense target)."""

    def __init__(self, weights: str | TeacherEnsemble, arch: str | None, num_classes: int, taps: Sequence[str],
                 device: torch.device, k: int | None = None):
        if isinstance(weights, TeacherEnsemble):
            self.ensemble = weights
        else:
            w = open_weights(weights)
            model = w.build(arch=arch, num_classes=num_classes, taps=taps, device=device, arch_option="--online-teacher")
            self.ensemble = TeacherEnsemble([Member(model.name, w, model, w.preprocess)], EnsemblePlan(),
                                            w.preprocess)
        for m in self.ensemble.members:
            for p in m.model.parameters():
                p.requires_grad_(False)
        self.k = k or num_classes
        size, shapes = self.ensemble.probe(_PROBE, device)
        #: what the teacher gives, described as a cache would be (for the methods' set-up)
        self.schema = CacheSchema.new(class_names=[f"class {c}" for c in range(num_classes)], k=self.k,
                                      input_size=_PROBE, map_size=size,
                                      feature_shapes=shapes, features=tuple(taps), attention=tuple(taps))

    @classmethod
    def from_cache(cls, schema: CacheSchema, taps: Sequence[str], device: torch.device) -> OnlineTeacher:
        """The teacher ``schema``'s cache was built with (every member, the same combination and
        test-time augmentation), with the cache's k."""
        # a store from before ensembles: its flip average was the mean of the logits
        record = schema.ensemble or {"flip": bool(schema.meta.get("flip_average")), "combine": "logit"}
        ens = from_record(schema.members, record, Preprocess.from_dict(schema.preprocess),
                          num_classes=schema.num_classes, taps=taps, device=device)
        return cls(ens, None, schema.num_classes, taps, device, k=schema.k)

    @property
    def model(self):
        """The (first) member's model."""
        return self.ensemble.members[0].model

    @torch.no_grad()
    def targets(self, batch: dict) -> dict:
        """The ``kd/…`` targets for ``batch``; where the batch came through the cache pipeline,
        its ``kd/ignore`` (the crop's padding at the cache's resolution) is kept."""
        x = batch["image"]
        out = self.ensemble(x)
        values, indices, tail = topk_targets(out.logits, self.k)
        size = tuple(values.shape[-2:])
        targets = {"kd/values": values.half().float(), "kd/indices": indices,
                   "kd/ignore": torch.zeros(x.shape[0], *size, dtype=torch.bool, device=x.device)}
        if tail is not None:
            targets["kd/tail"] = tail.half().float()
        for tap, f in out.features.items():
            ignore = torch.zeros(x.shape[0], *f.shape[-2:], dtype=torch.bool, device=x.device)
            for kind in signal_kinds():  # every teacher signal of the tap, as a cache would store it
                targets[f"kd/{kind}/{tap}"] = signal(kind).encode(f).half().float()
                targets[f"kd/{kind}/{tap}/ignore"] = ignore
        cached = batch.get("kd/ignore")
        if cached is not None and cached.shape == targets["kd/ignore"].shape:
            targets["kd/ignore"] = cached
        elif isinstance(batch.get("geometry"), list):  # the crop's padding, as the cache path marks it
            stride = (x.shape[-2] / size[0], x.shape[-1] / size[1])

            def padding(g):
                map_hw = (max(1, round(g.in_size[0] / stride[0])), max(1, round(g.in_size[1] / stride[1])))
                return sample_grid(g, map_hw, out_map_size(g.out_size, stride))[2]

            masks = []
            mixes = batch.get("mix") or [None] * len(batch["geometry"])
            for g, mix in zip(batch["geometry"], mixes):  # a mixed crop: its partner's padding where it shows
                masks.append(padding(g) if mix is None else mixed_padding(padding(g), padding(mix.geometry), mix,
                                                                          g.out_size))
            if all(tuple(m.shape) == size for m in masks):
                targets["kd/ignore"] = torch.stack(masks).to(x.device)
        return targets
