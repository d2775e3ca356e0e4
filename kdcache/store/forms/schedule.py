"""The schedule form: the teacher on every crop a student draws, epoch by epoch, so that cached
targets are the live teacher's on the student's own pixels."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.core.errors import KDCacheError
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.mixing import MixOptions, mix_images, mix_partner
from kdcache.pipeline.transforms import (
    AUGMENT_OPTIONS,
    Augment,
    apply_geometry,
    augment_from_dict,
    sample_geometry,
    schedule_geometry,
    training_augment,
)
from kdcache.pipeline.warp import view_targets
from kdcache.store.forms.base import FORMS, MAX_VIEWS, BuildContext, CacheForm


@FORMS.register("schedule")
class Schedule(CacheForm):
    """``build-teacher-cache --schedule-epochs E [--schedules R] [--first-schedule S]``: view
    ``r·E + e`` of an image is the crop a student with seed ``S + r`` draws in epoch ``e`` (the same
    draw from the same augmentation options, :func:`~kdcache.pipeline.transforms.schedule_geometry`),
    with the teacher's outputs on it. A student always replays its own schedule: each epoch reads its
    view alone (:meth:`view`) and its crop's targets are that view's.

    With ``--mix cutmix|mixup`` each view is the crop mixed with its partner's as a student with the
    same ``--mix`` options mixes it (:mod:`kdcache.pipeline.mixing`), and the teacher runs on the
    mixed crop: function matching, replayed."""

    targets_name = "schedule"
    options = "--schedule-epochs N"
    reads_views = True

    @classmethod
    def asked(cls, config) -> bool:
        return bool(config.schedule_epochs)

    @classmethod
    def holds(cls, schema) -> bool:
        return bool(schema.schedule)

    @classmethod
    def check_options(cls, config) -> None:
        # --schedule-epochs, --schedules and --first-schedule are within their declared bounds (check_declared)
        mix = MixOptions.of(config)
        if not config.schedule_epochs:
            given = [name for name, value, default in (
                ("--mix", mix.kind, "none"),
                ("--schedules", config.schedules, 1), ("--first-schedule", config.first_schedule, 0),
                ("--crop-size", config.crop, None), ("--scale", config.scale, (0.75, 1.25)),
                ("--crop-area", config.crop_area, (0.25, 1.0)), ("--flip", config.hflip, True)) if value != default]
            if given:
                raise KDCacheError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the crops of a schedule; "
                                   "add --schedule-epochs N (the epochs the students will train)")
            return
        if config.views or config.label_map:
            raise KDCacheError(f"--schedule-epochs and {'--views' if config.views else '--label-map'} are two forms "
                               "of stored targets; give one of them")
        if config.schedule_epochs * config.schedules > MAX_VIEWS:
            raise KDCacheError(f"--schedule-epochs {config.schedule_epochs} × --schedules {config.schedules} is "
                               f"{config.schedule_epochs * config.schedules} stored crops per image, past the "
                               f"{MAX_VIEWS} a record holds: store fewer schedules per store (--first-schedule S "
                               "--schedules R, one store per group of seeds)")
        for name, (lo, hi), top in (("--scale", config.scale, None), ("--crop-area", config.crop_area, 1.0)):
            if not 0 < lo <= hi or (top is not None and hi > top):
                raise KDCacheError(f"{name} must be 'lo,hi' with 0 < lo <= hi{' <= 1' if top else ''}, got {lo},{hi}")

    @classmethod
    def plan(cls, ctx: BuildContext) -> dict:
        config = ctx.config
        crop = tuple(config.crop) if config.crop else tuple(ctx.first_size())
        aug = training_augment(ctx.classification, crop, config.scale, config.crop_area, config.hflip)
        view_map, view_feats = ctx.teacher.probe(crop, ctx.device)
        return {"count": config.schedule_epochs * config.schedules, "scale": config.scale, "crop": crop, "seed": 0,
                "map_size": view_map, "feature_shapes": view_feats,
                "area": config.crop_area if ctx.classification else None,
                "schedule": {"epochs": config.schedule_epochs, "schedules": config.schedules,
                             **({"first": config.first_schedule} if config.first_schedule else {}),
                             "augment": aug.to_dict(),
                             **({"mix": MixOptions.of(config).to_dict()} if MixOptions.of(config).enabled else {})}}

    @property
    def augment(self) -> Augment:
        """The students' own augmentation, as the store records it."""
        return augment_from_dict(self.schema.schedule["augment"])

    def teacher_input(self, item: dict, image: torch.Tensor, index: int) -> None:
        # geometries only: the teacher's side cuts them on its device, a few at a time
        E, size, aug = int(self.schema.schedule["epochs"]), tuple(image.shape[-2:]), self.augment
        item["view_params"] = np.array([schedule_geometry(r, e, index, size, aug).pack()
                                        for r in self.schema.schedules_held for e in range(E)], dtype=np.float32)

    @property
    def mixing(self) -> MixOptions:
        """How the stored crops were mixed (none: not)."""
        return MixOptions.from_dict(self.schema.schedule.get("mix"))

    def teacher_views(self, teacher, x, items, batch):
        params = np.stack([it["view_params"] for it in items])
        mixed = None
        if self.mixing.enabled:  # each view's crop mixed with its partner's, as the student of its seed mixes it
            mix, aug, source = self.mixing, self.augment, self.source
            E = int(self.schema.schedule["epochs"])
            runs = [(r, e) for r in self.schema.schedules_held for e in range(E)]

            def mixed(j: int, v: int, crop: torch.Tensor) -> torch.Tensor:
                seed, epoch = runs[v]
                drawn = mix_partner(mix, seed, epoch, items[j]["index"], len(source), source.image,
                                    tuple(crop.shape[-2:]), lambda rng, size: sample_geometry(rng, size, aug),
                                    lambda image, g: apply_geometry(image, g, kind="image", fill=0.0))
                return crop if drawn is None else mix_images(crop, drawn[1].to(crop.device), drawn[0])
        return (*crops_forward(teacher, x, params, batch, mixed), params)

    def view(self, seed: int, epoch: int) -> int:
        return self.schema.view_of(seed, epoch)

    def item(self, pipe, index: int, cached: dict) -> dict:
        params = cached["views/params"]  # read alone: this epoch's view of this run's schedule
        item = pipe.transformed(index, lambda _i, size: Geometry.unpack(size, params[0]))
        item.update(view_targets(cached, 0))
        return item

    def check_student(self, store, config, augment: Augment | None) -> None:
        """Crops drawn with one augmentation for a number of epochs and schedules: refuse, in one
        line naming the option, a run that would draw others."""
        sched = self.schema.schedule
        E, held = int(sched["epochs"]), self.schema.schedules_held
        if config.epochs > E:
            raise KDCacheError(f"--epochs {config.epochs} is more than the {E} epochs the schedule of {store.path} "
                               f"holds; train --epochs {E} or fewer, or rebuild it with --schedule-epochs {config.epochs}")
        if config.seed not in held:
            first, last = held.start, held.stop - 1
            which = f"schedule {first}" if first == last else f"schedules {first}..{last}"
            built = f"--schedules {len(held)}" + (f" --first-schedule {first}" if first else "")
            if first == 0 and config.seed > last:  # (a seed is 0 or more: its declared bounds)
                hint = f"or rebuild it with --schedules {config.seed + 1}"
            else:  # this seed's crops alone
                hint = f"or build a cache of it with --first-schedule {config.seed} --schedules 1"
            raise KDCacheError(f"--seed {config.seed}: {store.path} holds {which} ({built}), one per seed; train "
                               f"with --seed {first if first == last else f'in {first}..{last}'} {hint}")
        have, want = MixOptions.of(config), self.mixing
        if have != want:
            hint = (f"--mix {want.kind} --mix-alpha {want.alpha:g} --mix-prob {want.prob:g}" if want.enabled
                    else "--mix none")
            raise KDCacheError(f"{store.path} holds a schedule whose crops were mixed {want.describe()}, and this run "
                               f"mixes {have.describe()}; train with {hint} (or rebuild the cache with this run's "
                               "--mix options)")
        stored = sched["augment"]
        mine = augment.to_dict() if augment is not None else {}
        for key in AUGMENT_OPTIONS:
            if key == "scale" and stored.get("resized_crop"):  # a random-resized crop has no scale range
                continue
            if key in stored and mine.get(key) != stored[key]:
                want = _augment_text(key, stored[key])
                raise KDCacheError(f"{store.path} holds a schedule drawn with {want}, and this run draws with "
                                   f"{_augment_text(key, mine.get(key))}; train with {want} (or rebuild the cache "
                                   "with this run's options)")

    def describe(self) -> str:
        views, sched = self.schema.views, self.schema.schedule
        crops = f"random-resized, area {views['area']}" if views.get("area") else f"scale {views['scale']}"
        a = sched["augment"]
        held = self.schema.schedules_held
        which = f"schedule {held.start}" if len(held) == 1 else f"schedules {held.start}..{held.stop - 1}"
        mixed = f", mixed: {self.mixing.describe()}" if self.mixing.enabled else ""
        return (f"a schedule: the crops of {sched['epochs']} epochs x {which} per image "
                f"({views['count']} views), crop {views['crop']}, {crops}, flip {'yes' if a.get('hflip') else 'no'}"
                f"{mixed}; train-student replays them (--seed picks the schedule)")


def _augment_text(key: str, value) -> str:
    option = AUGMENT_OPTIONS[key]
    if key == "hflip":
        return "--flip" if value else "--no-flip"
    if value is None:
        return f"no {option}"
    return f"{option} {'x'.join(map(str, value)) if key == 'crop' else ','.join(f'{v:g}' for v in value)}"


def crops_forward(teacher, x: torch.Tensor, params: np.ndarray, batch: int, mixed=None) -> tuple[torch.Tensor, dict]:
    """The teacher on the crops ``params`` [B, V, 7] of the images ``x`` [B, 3, H, W], cut on
    ``x``'s device as a training pipeline cuts them (:func:`apply_geometry`; ``mixed(j, v, crop)``,
    if given, mixes view ``v`` of image ``j`` as the student does) and run ``batch`` at a time:
    logits [B·V, C, h, w] and features, image by image and view by view."""
    size = tuple(x.shape[-2:])
    crops = [(j, v, p) for j in range(len(x)) for v, p in enumerate(params[j])]

    def cut(j: int, v: int, p) -> torch.Tensor:
        crop = apply_geometry(x[j], Geometry.unpack(size, p), kind="image")
        return crop if mixed is None else mixed(j, v, crop)

    logits, feats = [], {}
    for c in range(0, len(crops), batch):
        v = torch.stack([cut(j, i, p) for j, i, p in crops[c:c + batch]])
        out = teacher(v)
        logits.append(out.logits)
        for tap, f in out.features.items():
            feats.setdefault(tap, []).append(f)
    return torch.cat(logits), {tap: torch.cat(fs) for tap, fs in feats.items()}
