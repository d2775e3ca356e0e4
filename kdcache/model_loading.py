"""Models from run folders and checkpoints: the one place that turns saved weights into a model.

``open_weights(target)`` reads a run folder (its ``best.pt``, else ``last.pt``, and its
``config.json``), a kdcache checkpoint (its own stored config) or a plain state dict, once;
:meth:`Weights.build` then builds the architecture with those weights, checking what the caller
knows (the architecture a user named, the class count of the data) against what the weights
say. The cache build's teacher, the online teacher, ``evaluate`` and ``compare`` all load
through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache.checkpoint import file_sha256, load_state, read_checkpoint
from kdcache.errors import CheckpointError
from kdcache.models import SegModel, build_model
from kdcache.runs import resolve_run
from kdcache.transforms import Preprocess


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
    def preprocess(self) -> Preprocess:
        """The preprocessing the weights were trained with (ImageNet normalisation by default)."""
        return Preprocess.from_dict(self.config.get("preprocess", {}))

    def sha256(self) -> str:
        return file_sha256(self.checkpoint)

    def build(self, *, arch: str | None = None, num_classes: int | None = None, taps: Sequence[str] = (),
              device: torch.device | str | None = None, arch_option: str | None = None) -> SegModel:
        """The model with these weights, in eval mode (on ``device`` if given).

        ``arch``: the architecture the user named (must agree with the weights'; needed for a
        plain state dict). ``num_classes``: the class count of the data (must agree with the
        weights'). ``arch_option``: the command-line option that names the architecture, for
        the error message when a plain state dict needs one."""
        stored = self.arch
        if arch and stored and arch != stored:
            raise CheckpointError(f"{arch_option or 'the architecture'} {arch} but {self.checkpoint} holds a "
                                  f"'{stored}'; drop {arch_option or 'it'} or give the right weights")
        name = arch or stored
        if not name:
            how = (f"say which architecture it is with {arch_option}" if arch_option
                   else "give a run folder or a kdcache checkpoint")
            raise CheckpointError(f"{self.checkpoint} is a plain state dict: {how}")
        known = self.num_classes
        if num_classes is not None and known is not None and known != num_classes:
            raise CheckpointError(
                f"{self.checkpoint} predicts {known} classes but the data set has {num_classes}; use weights "
                "trained on this data set"
            )
        classes = num_classes if num_classes is not None else known
        if classes is None:
            raise CheckpointError(f"{self.checkpoint} does not say how many classes its model predicts; give a "
                                  "kdcache checkpoint, or add num_classes to its run's config.json")
        model = build_model(name, classes, taps=taps, **self.config.get("model_options", {}))
        load_state(model, self.contents, self.checkpoint)
        if device is not None:
            model.to(device)
        return model.eval()


def open_weights(target: str | Path) -> Weights:
    """The weights of a run folder, a kdcache checkpoint or a plain state dict, read once."""
    ckpt_path, run_config, run_dir = resolve_run(target)
    contents = read_checkpoint(ckpt_path)
    config = dict(run_config or contents.get("config") or {})
    return Weights(ckpt_path, contents, config, run_dir)
