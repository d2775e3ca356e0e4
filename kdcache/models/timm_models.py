"""timm's models by name (the ``timm`` extra): ``--model timm/<name>``, e.g. ``timm/resnet18``,
``timm/mobilenetv3_small_100``, ``timm/convnext_atto``, ``timm/deit_tiny_patch16_224``.

Built with ``pretrained=False`` (nothing is downloaded; trained weights come from local files
with ``--weights``) and ``num_classes``; other timm options pass through ``-m KEY=VALUE`` (e.g.
``-m drop_rate=0.1``). timm is imported when such a model is first built.
"""

from __future__ import annotations

from torch import nn

from kdcache.core.errors import ModelError, import_extra
from kdcache.models.registry import register_prefix

SOURCE, EXTRA, PACKAGE = "timm", "timm", "timm"
TASK = "classification"
PREFIX = "timm/"


def timm_builder(model_name: str):
    def build(num_classes: int, **options) -> nn.Module:
        if options.pop("pretrained", False):
            raise ModelError("timm models are built without downloaded weights; give a local file with --weights")
        timm = import_extra(f"the model {PREFIX}{model_name}", "timm", "timm")[0]
        if not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name[:6]}*")[:5]
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ModelError(f"timm has no model '{model_name}'{hint}")
        try:
            return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **options)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"timm could not build {PREFIX}{model_name} with options {options}: {exc}") from None

    build.__name__ = f"{PREFIX}{model_name}"
    build.TASK = TASK
    return build


register_prefix(PREFIX, timm_builder, "timm/<name>: any timm model", extra=EXTRA, package=PACKAGE)
