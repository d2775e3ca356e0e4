"""Models: a registry of segmentation networks and one uniform output.

``build_model(name, num_classes)`` accepts
- torchvision's segmentation builders by function name (:mod:`.torchvision_models`), always
  built with ``weights=None, weights_backbone=None`` — nothing is downloaded;
- the built-in CPU-sized pair ``demo_teacher`` / ``demo_student`` (:mod:`.builtin`);
- any ``package.module:callable`` taking ``num_classes=`` and returning an ``nn.Module``.

Every model is wrapped in :class:`~kdcache.models.wrapper.SegModel`, whose forward returns
logits at the head's native stride plus the features requested by module name. Add a family:
a new module here whose builders are decorated ``@register_model``; every module of this
package is imported, so nothing else needs editing.
"""

from kdcache.core.registry import import_submodules
from kdcache.models.registry import (
           MODELS,
           build_model,
           count_parameters,
           model_groups,
           register_model,
           resolve_builder,
)
from kdcache.models.wrapper import ModelOutput, SegModel

import_submodules(__name__, __path__)

__all__ = ["MODELS", "ModelOutput", "SegModel", "build_model", "count_parameters", "model_groups", "register_model",
           "resolve_builder"]
