"""Models from run folders and checkpoints: the one place that turns saved weights into a model.

``open_weights(target)`` reads, once, and detecting the format:
- a kdcache run folder (its ``best.pt``, else ``last.pt``, and its ``config.json``) or checkpoint;
- a plain state dict, ``.pt``/``.pth`` or ``.safetensors``;
- a Hugging Face model folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)
  of a SegFormer, read by transformers itself (``from_pretrained``, local files only), so its own
  key conversions apply;
- an mmsegmentation SegFormer checkpoint (``state_dict`` with MixVisionTransformer and
  SegformerHead keys), converted on load (:func:`kdcache.models.segformer.from_mmseg`);
:meth:`Weights.build` then builds the architecture with those weights, checking what the caller
knows (the architecture a user named, the class count of the data) against what the weights
say. The cache build's teacher, the online teacher, ``evaluate`` and ``compare`` all load
through here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache.core.checkpoint import load_state, read_checkpoint
from kdcache.core.errors import CheckpointError
from kdcache.core.outputs import file_sha256
from kdcache.core.runs import resolve_run
from kdcache.models import SegModel, build_model
from kdcache.models.registry import model_task
from kdcache.models.segformer import (
    VARIANTS,
    from_mmseg,
    is_mmseg_segformer,
    transformers_module,
    variant_of,
)
from kdcache.pipeline.transforms import Preprocess


@dataclass
class Weights:
    """Saved weights and what is known about them."""

    checkpoint: Path
    contents: dict  # the checkpoint as read (a plain state dict comes as {"state_dict": ...})
    config: dict  # the run's config.json, or the checkpoint's own config, or {}
    run_dir: Path | None

    @property
    def arch(self) -> str | None:
        """The architecture's registry name (or module:callable), if the weights say."""
        return self.contents.get("model") or self.config.get("model")

    @property
    def num_classes(self) -> int | None:
        n = self.contents.get("num_classes") or self.config.get("num_classes")
        return int(n) if n is not None else None

    @property
    def model_options(self) -> dict:
        """Options the architecture needs for these weights (e.g. an mmseg checkpoint's head)."""
        return dict(self.config.get("model_options") or {})

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing the weights were trained with (ImageNet normalisation by default)."""
        return Preprocess.from_dict(self.config.get("preprocess", {}))

    def sha256(self) -> str:
        return file_sha256(self.checkpoint)

    def weights_sha256(self) -> str:
        """SHA-256 of the weights alone, tensor by tensor in name order: the same for two checkpoints
        of the same weights whatever else they hold (epoch, optimiser, the run's configuration)."""
        h = hashlib.sha256()
        sd = self.contents["state_dict"]
        for name in sorted(sd):
            h.update(name.encode())
            h.update(sd[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def build(self, *, arch: str | None = None, num_classes: int | None = None, taps: Sequence[str] = (),
              device: torch.device | str | None = None, arch_option: str | None = None,
              task: str | None = None, class_names: Sequence[str] | None = None) -> SegModel:
        """The model with these weights, in eval mode (on ``device`` if given).

        ``arch``: the architecture the user named (must agree with the weights'; needed for a
        plain state dict). ``num_classes``: the class count of the data (must agree with the
        weights'). ``class_names``: the data's, in class-id order (must agree with the names the
        weights were trained with, where both are known: the same count in another order scores
        every class as another). ``arch_option``: the command-line option that names the
        architecture, for the error message when a plain state dict needs one."""
        stored = self.arch
        if arch and stored and arch != stored:
            raise CheckpointError(f"{arch_option or 'the architecture'} {arch} but {self.checkpoint} holds a "
                                  f"'{stored}'; drop {arch_option or 'it'} or give the right weights")
        name = arch or stored
        if not name:
            how = (f"say which architecture it is with {arch_option}" if arch_option
                   else "give a run folder or a kdcache checkpoint")
            raise CheckpointError(f"{self.checkpoint} is a plain state dict: {how}")
        theirs = model_task(name)
        if task is not None and theirs is not None and theirs != task:
            raise CheckpointError(f"{self.checkpoint} holds a {theirs} network ({name}) and the data set is a {task} "
                                  f"data set; give a {task} model's weights")
        known = self.num_classes
        if num_classes is not None and known is not None and known != num_classes:
            raise CheckpointError(
                f"{self.checkpoint} predicts {known} classes but the data set has {num_classes}; use weights "
                "trained on this data set"
            )
        check_class_names(self.config.get("class_names"), class_names, str(self.checkpoint))
        classes = num_classes if num_classes is not None else known
        if classes is None:
            raise CheckpointError(f"{self.checkpoint} does not say how many classes its model predicts; give a "
                                  "kdcache checkpoint, or add num_classes to its run's config.json")
        model = build_model(name, classes, taps=taps, **self.config.get("model_options", {}))
        load_state(model, self.contents, self.checkpoint)
        if device is not None:
            model.to(device)
        return model.eval()


def check_class_names(theirs: Sequence[str] | None, mine: Sequence[str] | None, what: str) -> None:
    """One line where the class names ``what`` was trained with and the data's differ (by more than
    case and spaces): an ImageFolder whose class folders are spelt or sorted otherwise, a
    classes.txt in another order."""
    if not theirs or not mine:
        return
    a, b = [str(n).strip().casefold() for n in theirs], [str(n).strip().casefold() for n in mine]
    if a == b:
        return
    if len(a) != len(b):
        return  # the class count's own error says it
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    shown = ", ".join(f"class {i}: '{theirs[i]}' / '{mine[i]}'" for i in diff[:3]) + (" …" if len(diff) > 3 else "")
    raise CheckpointError(f"{what} was trained on classes named otherwise than the data's ({shown}; theirs / the "
                          "data's): its class ids would be scored as other classes; give data with the same class "
                          "names in the same order (classes.txt, or the class folders' names)")


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_folder(path: Path) -> bool:
    """A folder written by ``save_pretrained``: a config.json with a ``model_type``."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def open_weights(target: str | Path, *, encoder_only: bool = False) -> Weights:
    """The weights of a run folder, a kdcache checkpoint, a state dict (.pt/.pth/.safetensors),
    a Hugging Face SegFormer folder or an mmseg SegFormer checkpoint, read once.
    ``encoder_only``: a Hugging Face encoder folder (e.g. MiT-b0 for image classification) is
    accepted too (for ``--backbone-weights``)."""
    path = Path(target)
    if is_hf_folder(path):
        return _open_hf_folder(path, encoder_only)
    ckpt_path, run_config, run_dir = resolve_run(target)
    contents = read_checkpoint(ckpt_path)
    config = dict(run_config or contents.get("config") or {})
    if is_mmseg_segformer(contents["state_dict"]):
        arch, options, sd = from_mmseg(contents["state_dict"])
        classes = int(sd["decode_head.conv_seg.weight"].shape[0])
        contents = {"state_dict": sd, "model": arch, "num_classes": classes}
        config = {"model": arch, "num_classes": classes, "model_options": options}
    return Weights(ckpt_path, contents, config, run_dir)


def _open_hf_folder(path: Path, encoder_only: bool) -> Weights:
    cfg = json.loads((path / "config.json").read_text())
    weights_file = next((path / f for f in HF_WEIGHT_FILES if (path / f).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f"Hugging Face folder {path} lacks both {' and '.join(HF_WEIGHT_FILES)}; write it "
                              "with save_pretrained")
    if cfg.get("model_type") != "segformer":
        raise CheckpointError(f"{path} holds a '{cfg.get('model_type')}' model; kdcache reads Hugging Face folders "
                              "of SegFormer only (other models: --model package.module:callable with a state dict)")
    variant = variant_of(cfg.get("hidden_sizes", ()), cfg.get("depths", ()))
    if variant is None:
        raise CheckpointError(f"{path}: SegFormer with hidden_sizes {cfg.get('hidden_sizes')} and depths "
                              f"{cfg.get('depths')} is none of B0-B5")
    t = transformers_module()
    segmentation = "SegformerForSemanticSegmentation" in cfg.get("architectures", ["SegformerForSemanticSegmentation"])
    if not segmentation and not encoder_only:
        raise CheckpointError(f"{path} is a SegFormer encoder ({', '.join(cfg['architectures'])}) without a "
                              "segmentation head; load it with --backbone-weights")
    declared = next((a for a in cfg.get("architectures", []) if a.startswith("Segformer")), None)
    cls = t.SegformerForSemanticSegmentation if segmentation else getattr(t, declared or "", t.SegformerModel)
    verbosity = t.logging.get_verbosity()
    t.logging.set_verbosity_error()  # kdcache reports what was loaded itself
    t.logging.disable_progress_bar()
    try:
        net = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers and safetensors raise many types
        raise CheckpointError(f"transformers cannot load {path}: {exc}") from None
    finally:
        t.logging.set_verbosity(verbosity)
        t.logging.enable_progress_bar()
    arch = f"segformer_{variant}"
    contents = {"state_dict": net.state_dict(), "model": arch}
    config = {"model": arch}
    if segmentation:
        contents["num_classes"] = config["num_classes"] = int(cfg.get("num_labels") or len(cfg["id2label"]))
        if cfg.get("decoder_hidden_size") not in (None, VARIANTS[variant]["decoder_hidden_size"]):
            config["model_options"] = {"decoder_hidden_size": int(cfg["decoder_hidden_size"])}
    return Weights(weights_file, contents, config, None)


def load_weights_into(model: SegModel, weights: Weights) -> None:
    """Initialise ``model`` (built by a trainer) with ``weights``, checking every key and shape."""
    load_state(model, weights.contents, weights.checkpoint)
