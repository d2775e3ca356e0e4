"""The plain form: the teacher's maps of each whole image, taken through every crop's geometry."""

from __future__ import annotations

from kdcache.store.forms.base import FORMS, CacheForm


@FORMS.register("plain")
class Plain(CacheForm):
    """The base maps alone (``logits/…`` and the teacher signals); a crop takes them through its own
    geometry, nearest cell (or ``--target-resample bilinear``). Every other form falls back to it."""
