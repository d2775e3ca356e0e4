"""segmentation_models_pytorch (the ``smp`` extra): every architecture, with any of its encoders.

``smp_unet``, ``smp_fpn``, ``smp_deeplabv3plus``, ``smp_segformer``, ... (one name per smp
architecture) take smp's options, ``encoder_name`` first (default ``resnet34``; e.g.
``mobilenet_v2``, ``efficientnet-b0``, ``mit_b0``): ``--model smp_unet --model-option
encoder_name=resnet18``. Encoders are always built with ``encoder_weights=None``: pretrained
encoders come from local files with ``--backbone-weights`` (the encoder is the model's
``encoder``), never from a download. smp's heads upsample to the input size, so the logits (and
a cache of them) come at stride 1; the encoder's stages are tapped as ``encoder`` submodules
and the decoder as ``decoder``.

smp is imported when one of these models is first built (an optional extra that imports timm).
"""

from __future__ import annotations

from torch import nn

from kdcache.core.errors import ModelError, import_extra
from kdcache.models.registry import MODELS

#: smp's architecture names (``smp.create_model(arch)``), in smp 0.6's order
SOURCE, EXTRA, PACKAGE = "segmentation_models_pytorch", "smp", "segmentation_models_pytorch"
ARCHITECTURES = ("unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan",
                 "upernet", "segformer", "dpt")


def smp_module():
    return import_extra("an smp_* model", "smp", "segmentation_models_pytorch")[0]


def _builder(arch: str):
    def build(num_classes: int, encoder_name: str = "resnet34", **options) -> nn.Module:
        if options.pop("encoder_weights", None) is not None:
            raise ModelError("smp encoders are built without downloaded weights; give a local encoder file with "
                             "--backbone-weights instead of encoder_weights")
        smp = smp_module()
        try:
            return smp.create_model(arch, encoder_name=encoder_name, encoder_weights=None, classes=num_classes,
                                    **options)
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"smp_{arch} with encoder '{encoder_name}': {exc}") from None

    build.__name__ = f"smp_{arch}"
    build.__doc__ = f"segmentation_models_pytorch {arch} (encoder_name=..., encoder_weights=None), stride 1 [smp]"
    return build


for _arch in ARCHITECTURES:
    MODELS.add(f"smp_{_arch}", _builder(_arch))
