"""The cache form's contract (:class:`CacheForm`), its registry and how a store's form is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.core.errors import KDCacheError
from kdcache.core.registry import Registry
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.warp import warp_targets

#: the most views one sample's record may hold (``--views``, and a schedule's epochs × schedules): each is a
#: teacher forward at build time and a slot of every per-view array in the sample's record
MAX_VIEWS = 65536


@dataclass
class BuildContext:
    """What a build knows when it plans its store: its options (``config``, a
    ``CacheBuildConfig``), the teacher (``probe(size, device)`` gives its map size and feature
    shapes on an input of ``size``), every image's input size, the task, the device, and the first
    image as the teacher sees it (``first_size()``)."""

    config: Any
    teacher: Any
    sizes: list[tuple[int, int]]
    classification: bool
    device: torch.device
    first_size: Any


class CacheForm:
    """One form of a teacher cache. A subclass overrides what differs from a plain store:

    - chosen: :meth:`asked` (a build's options ask for it), :meth:`holds` (a store is of it),
      :meth:`check_options` (the build options that go with it, in one-line errors);
    - built: :meth:`plan` (the ``views`` the schema records: None for no views),
      :attr:`class_map` (the teacher gives its class map before pooling), :meth:`teacher_input`
      (what a build's data item adds: view geometries, crops), :meth:`teacher_views` (the
      teacher's outputs on the views of a batch), :meth:`quality_rows`;
    - trained: :meth:`for_training` (the form a student's crops read, given ``--use-views``),
      :meth:`view` (the one view an epoch reads), :meth:`item` (a crop and its targets),
      :meth:`check_student`;
    - described: :meth:`describe` (``inspect-cache``'s views row) and :attr:`targets_name` (a run's
      ``cache_targets``).

    An instance belongs to one store (``schema``); :meth:`plan` and the class methods run before
    the store exists."""

    name = ""
    #: what a student run records as its ``cache_targets``
    targets_name = "logits"
    #: the teacher gives its class map before global pooling (a classifier's label map)
    class_map = False
    #: a student's items come from the stored views (``views/…``) instead of the base maps
    reads_views = False
    #: the build options this form is made from, as a user gives them ("" for a form with none)
    options = ""
    #: a build's inputs (``len``, ``image(j)``: sample j preprocessed as the teacher sees it), set
    #: before :meth:`teacher_views` runs, for a form whose views need other images than their own
    source = None

    def __init__(self, schema):  # the store's CacheSchema
        self.schema = schema

    # -- chosen ---------------------------------------------------------------------------------
    @classmethod
    def asked(cls, config) -> bool:
        """Whether the build options ``config`` ask for this form (besides ``--form NAME``)."""
        return False

    @classmethod
    def holds(cls, schema) -> bool:
        """Whether the store of ``schema`` is of this form."""
        return schema.meta.get("form") == cls.name

    @classmethod
    def check_options(cls, config) -> None:
        """Refuse, in one line naming the options, build options that do not go with this form
        (called for every form, whichever is asked)."""

    # -- built ----------------------------------------------------------------------------------
    @classmethod
    def plan(cls, ctx: BuildContext) -> dict | None:
        """The ``views`` of :meth:`CacheSchema.new` (count, scale, crop, seed, the teacher's
        ``map_size`` and ``feature_shapes`` on a view, …), or None: the store holds no views."""
        return None

    def teacher_input(self, item: dict, image: torch.Tensor, index: int) -> None:
        """Add what the teacher needs besides the whole image (``image``, preprocessed) to the
        build's data item of sample ``index``: view geometries, crops."""

    def teacher_views(self, teacher, x: torch.Tensor, items: list[dict], batch: int
                      ) -> tuple[torch.Tensor, dict, np.ndarray] | None:
        """The teacher's outputs on the stored views of the images ``x`` (whose data items are
        ``items``): logits [B·V, …], features, packed geometries [B, V, 7]; None: no views."""
        return None

    def quality_rows(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher outputs whose per-sample quality the store records."""
        return rows

    # -- trained --------------------------------------------------------------------------------
    def for_training(self, use_views: bool) -> CacheForm:
        """The form a student's crops take their targets by (``--use-views`` given or not)."""
        return self

    def view(self, seed: int, epoch: int) -> int | None:
        """The one stored view epoch ``epoch`` of a run with ``seed`` reads (None: all, or none)."""
        return None

    def item(self, pipe, index: int, cached: dict) -> dict:
        """The training item of sample ``index`` with its targets from ``cached`` (the sample's
        maps as read): ``pipe`` (a ``KDPipeline``) transforms the image and label. Plain: the
        crop's own geometry, every map through it (:func:`~kdcache.pipeline.warp.warp_targets`)."""
        item = pipe.transformed(index, pipe.geometry if pipe.augment is not None else None)
        if cached:
            item.update(self.crop_targets(pipe, cached, crop_geometry(item)))
        return item

    def crop_targets(self, pipe, cached: dict, g: Geometry) -> dict:
        """The ``kd/…`` targets of the crop ``g`` from the sample's ``cached`` maps."""
        return warp_targets(cached, g, pipe.strides, pipe.resample, self.schema.num_classes)

    def check_student(self, store, config, augment) -> None:
        """Refuse, in one line, a student run (``config``: epochs, seed, …) this store cannot serve."""

    # -- described ------------------------------------------------------------------------------
    def describe(self) -> str:
        """``inspect-cache``'s row of what the store holds besides the base maps."""
        return "none"


def crop_geometry(item: dict) -> Geometry:
    """The geometry an item was cut with (the identity when it was not augmented)."""
    return item.get("geometry") or Geometry.identity(tuple(item["image"].shape[-2:]))


FORMS: Registry[type[CacheForm]] = Registry("cache form")


def form_of(schema) -> CacheForm:
    """The form of a store, from its schema: the one its ``form`` attribute names, or else (a store
    written before forms were recorded) the built-in form whose arrays it has; plain if none."""
    named = schema.meta.get("form")
    if named:
        if named not in FORMS:
            raise KDCacheError(f"the store's form '{named}' is not one this kdcache knows "
                               f"({', '.join(FORMS.names())}); install the version or plug-in that wrote it")
        return FORMS.get(named)(schema)
    for name in FORMS.names():
        if name != "plain" and FORMS.get(name).holds(schema):
            return FORMS.get(name)(schema)
    return FORMS.get("plain")(schema)


def requested_form(config) -> type[CacheForm]:
    """The form a build's options ask for: ``--form NAME``, or the one whose options are given
    (``--views``, ``--schedule-epochs``, ``--store-scales``/``--store-flips``, ``--label-map``), or plain."""
    asked = [cls for _, cls in FORMS.items() if cls.asked(config)]
    named = getattr(config, "form", None)
    if named:
        chosen = FORMS.get(named)
        others = [cls.name for cls in asked if cls is not chosen]
        if others:
            raise KDCacheError(f"--form {named} and the options of the {others[0]} form are two forms of stored "
                               "targets; give one of them")
        if chosen.options and not chosen.asked(config):
            raise KDCacheError(f"--form {named} is made from its options: give {chosen.options} (which alone "
                               "choose it)")
        return chosen
    return asked[0] if asked else FORMS.get("plain")
