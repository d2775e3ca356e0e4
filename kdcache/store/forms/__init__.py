"""Cache forms: what a store holds beside the teacher's map of each whole image, and how a training
crop takes its targets from it.

Each form is one class registered in :data:`FORMS` (:mod:`.base`): ``plain`` (the base maps alone),
``views`` (random crops with the teacher on each, FKD-style), ``schedule`` (the crops a student
draws in each epoch), ``pyramid`` (the whole image at other scales and mirrored) and ``label_map``
(a classifier's class map before pooling). A store's form is chosen once, from its schema
(:func:`form_of`); the build, the student's items, ``inspect-cache`` and the checks ask it. A new form
is one module here whose class is decorated ``@FORMS.register("name")``; every module of this package
is imported, and ``build-teacher-cache --form name`` builds it.
"""

from kdcache.core.registry import import_submodules
from kdcache.store.forms.base import (
    FORMS,
    MAX_VIEWS,
    BuildContext,
    CacheForm,
    form_of,
    requested_form,
)

import_submodules(__name__, __path__)

__all__ = ["FORMS", "MAX_VIEWS", "BuildContext", "CacheForm", "form_of", "requested_form"]
