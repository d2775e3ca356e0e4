"""Checkpoints: kdcache's own format, and plain state dicts from anywhere else.

A kdcache checkpoint is a ``torch.save`` dict with ``format = "kdcache-checkpoint"``; it holds
the model's name and class count (so ``evaluate`` can rebuild it without options), the data
set's class names and palette, the network's state dict (the wrapped ``net``'s keys, so
torchvision's own state dicts are interchangeable), and — for ``--resume`` — the optimizer,
scheduler, scaler and RNG states. It is read with ``weights_only=True``: only tensors and
plain containers, never arbitrary pickled code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache import __version__
from kdcache.core.errors import CheckpointError, import_extra
from kdcache.core.outputs import temporary
from kdcache.core.progress import console

FORMAT = "kdcache-checkpoint"
FORMAT_VERSION = 1

#: torchvision's auxiliary FCN head (FCN, DeepLabV3 ``aux_loss=True``): its published weights have it
AUX_HEAD = "aux_classifier."


def save_checkpoint(path: str | Path, model: nn.Module, **extra: Any) -> Path:
    """Write ``model``'s weights plus ``extra`` entries atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    net = getattr(model, "net", model)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kdcache_version": __version__,
        "model": getattr(model, "name", type(net).__name__),
        "num_classes": getattr(model, "num_classes", None),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    payload.update(extra)
    tmp = temporary(path)
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


class _Stand_in:
    """What a class that a checkpoint names, other than tensors and containers, unpickles to:
    nothing is imported or run for it (its state is kept in ``state``)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


#: what the tolerant reader builds for real; every other class becomes a stand-in
_REAL = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
         ("torch.nn.parameter", "Parameter"), ("builtins", "set"), ("builtins", "frozenset"),
         ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray")}


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _REAL or (module == "torch._utils" and name.startswith("_rebuild_")) or (
                module == "torch._tensor" and name.startswith("_rebuild_")) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        return type(name, (_Stand_in,), {"__module__": "kdcache.stand_in." + module})


class _TolerantPickle:
    """A ``pickle_module`` for ``torch.load``: tensors and plain containers for real, any other
    class a stand-in. For checkpoints whose extras name classes of other libraries (an
    mmsegmentation ``iter_40000.pth`` holds mmengine's ``HistoryBuffer``, numpy scalars, ...)
    that ``weights_only`` refuses and that this process should neither import nor run."""

    Unpickler = _TolerantUnpickler
    load = staticmethod(lambda f, **kw: _TolerantUnpickler(f, **kw).load())
    __name__ = "kdcache_tolerant_pickle"


def _read_safetensors(path: Path) -> dict[str, Any]:
    st = import_extra(f"reading {path.name}", "safetensors", "safetensors.torch")[0]
    try:
        return st.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path} as a safetensors file ({exc}); is it truncated?") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file; a plain state dict (``.pt``/``.pth`` or ``.safetensors``) comes back
    as ``{"state_dict": sd}``. A ``.pt``/``.pth`` file is read with ``weights_only=True``; one that
    it refuses only for classes of other libraries in its extras is read again by a tolerant
    unpickler that imports and runs none of them (see :class:`_TolerantPickle`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a checkpoint file (e.g. {path}/best.pt)")
    if path.suffix == ".safetensors":
        return {"state_dict": _read_safetensors(path)}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TolerantPickle)
        except Exception:  # unpickling errors come in many types
            raise CheckpointError(
                f"cannot read {path} as a PyTorch checkpoint ({type(first).__name__}: {first}). Is the "
                "file truncated, or not a torch.save file?"
            ) from None
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {exc}). Is the "
            "file truncated, or not a torch.save file?"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint or a state dict")
    if obj.get("format") == FORMAT:
        return obj
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return {"state_dict": obj[key]}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    raise CheckpointError(
        f"{path} is neither a kdcache checkpoint nor a state dict (its keys: {sorted(obj)[:8]})"
    )


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (a SegModel or a plain module).

    Accepts a kdcache checkpoint or a plain state dict (``module.``/``net.`` prefixes from
    DataParallel or the wrapper are stripped). A missing or unexpected key, or a tensor of
    another shape (e.g. a head for another class count), is a :class:`CheckpointError` that
    says which. Returns the checkpoint dict.
    """
    return load_state(model, read_checkpoint(path), path, strict=strict)


def non_finite_parameters(module: nn.Module) -> list[str]:
    """The names of ``module``'s parameters that hold inf or NaN (one host synchronisation on a GPU
    when there are none)."""
    params = list(module.named_parameters())
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return []
    return [name for name, p in params if not bool(torch.isfinite(p).all())]


def load_state(model: nn.Module, ckpt: dict[str, Any], path: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """:func:`load_weights` for a checkpoint already read (``path`` names it in errors)."""
    net = getattr(model, "net", model)
    sd = _strip_prefix(_strip_prefix(ckpt["state_dict"], "module."), "net.")
    own = net.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    aux = [k for k in unexpected if k.startswith(AUX_HEAD)]
    if aux and getattr(net, "aux_classifier", None) is None:
        # torchvision's published FCN/DeepLabV3 weights carry the auxiliary head that only their
        # training loss reads; the model's logits never use it
        console.print(f"note: {path}: left out {len(aux)} tensors of the auxiliary head ({AUX_HEAD}*), which only "
                      "torchvision's training loss uses (train-teacher -m aux_loss=true builds the head and keeps them)",
                      highlight=False, soft_wrap=True)
        sd = {k: v for k, v in sd.items() if not k.startswith(AUX_HEAD)}
        unexpected = [k for k in unexpected if not k.startswith(AUX_HEAD)]
    problems = []
    if mismatched:
        problems.append("shape mismatch in " + "; ".join(mismatched[:4]) + (" ..." if len(mismatched) > 4 else ""))
        n_ck = ckpt.get("num_classes")
        n_model = getattr(model, "num_classes", None)
        if n_ck is not None and n_model is not None and n_ck != n_model:
            problems.append(f"the checkpoint was trained for {n_ck} classes, the model has {n_model}")
    if strict and missing:
        problems.append(f"{len(missing)} keys missing from the checkpoint (e.g. {missing[:3]})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in the checkpoint (e.g. {unexpected[:3]})")
    if problems:
        arch = ckpt.get("model")
        what = f" (saved from model '{arch}')" if arch else ""
        raise CheckpointError(
            f"weights in {path}{what} do not fit model '{getattr(model, 'name', type(net).__name__)}': "
            + "; ".join(problems)
        )
    net.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=strict)
    # a model with inf or NaN weights predicts nothing, yet evaluate and compare would score it
    broken = non_finite_parameters(net)
    if broken:
        raise CheckpointError(f"weights in {path} hold inf or NaN values ({len(broken)} tensors, e.g. {broken[0]}); "
                              "use the checkpoint of a run that trained without diverging")
    return ckpt

