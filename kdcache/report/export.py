"""A run's model as a file for deployment: ONNX, safetensors or TorchScript, plus a JSON sidecar.

What is exported is :class:`LogitsOnly`: the run's ``SegModel`` reduced to one input ``image``
([N, 3, H, W] float32, RGB normalised with the run's mean and std, at a fixed H x W, any batch
size N) and one output ``logits`` ([N, C, h, w]): raw logits at the head's **native stride**,
not upsampled and not argmaxed. A deployment upsamples them bilinearly (align_corners=False) to
the size it wants and takes the argmax, as ``SegModel.predict`` and every kdcache metric do;
keeping the stride makes the graph smaller and faster and leaves the output size to the user.

Every export is checked before it is kept: the written file is loaded back (ONNX Runtime,
``torch.jit.load``, or ``safetensors`` into a freshly built model) and run on random inputs at
batch 1 and 2, and its logits must match the PyTorch model's within
``RTOL * max(1, max |logit|)``. The measured maximum absolute difference goes into the sidecar
``<file>.json`` with the model, classes, input size, stride and preprocessing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from kdcache import __version__
from kdcache.core.errors import ExportError, KDCacheError, import_extra
from kdcache.core.outputs import SIGNATURE, file_sha256, output_file, sidecar_path, temporary
from kdcache.core.runs import BEST, write_json
from kdcache.models import SegModel
from kdcache.models.loading import Weights, open_weights
from kdcache.models.onnx_session import OnnxSegModel
from kdcache.pipeline.transforms import SegPipeline
from kdcache.report.evaluation import eval_dataset

#: format -> the file name of an export into the run folder's export/
FORMATS = {"onnx": "model.onnx", "safetensors": "model.safetensors", "torchscript": "model.torchscript.pt"}
DEFAULT_OPSET = 17
#: the opsets the TorchScript-based ONNX exporter writes (11: bilinear Resize as PyTorch computes it)
OPSETS = (11, 20)
#: an export must match PyTorch within RTOL * max(1, max |logit|) (float32 graphs differ by ~1e-7)
RTOL = 1e-4
CHECK_BATCHES = (1, 2)


class LogitsOnly(nn.Module):
    """The deployed network: ``model``'s forward reduced to its native-stride logits tensor."""

    def __init__(self, model: SegModel):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image).logits


def default_path(weights: Weights, fmt: str) -> Path:
    """RUN/export/<file> for a run's best.pt (RUN/export-last/… for another checkpoint of a run,
    CKPT-export/… beside a bare checkpoint), like evaluate's RUN/eval."""
    ckpt = weights.checkpoint
    if weights.run_dir is not None:
        folder = weights.run_dir / ("export" if ckpt.name == BEST else f"export-{ckpt.stem}")
    else:
        folder = ckpt.parent / f"{ckpt.stem}-export"
    return folder / FORMATS[fmt]


def run_input_size(weights: Weights) -> tuple[int, int]:
    """The size the run's model sees: its ``--resize``, else its evaluation images' size (as
    ``evaluate`` records ``input_size``)."""
    resize = weights.preprocess.resize
    if resize:
        return tuple(resize)
    try:
        _, ds, _ = eval_dataset(weights.config)
        return tuple(SegPipeline(ds, weights.preprocess)[0]["image"].shape[-2:])
    except KDCacheError as exc:
        raise ExportError(f"the input size is read from the run's data set, which cannot be opened ({exc}); "
                          "give --input-size HxW") from None


def _check_out(out: Path, weights: Weights) -> None:
    """Refuse to write over anything but an earlier export (a checkpoint, someone's file): the file
    and its sidecar follow :func:`kdcache.core.outputs.output_file`."""
    if out.exists() and out.resolve() == weights.checkpoint.resolve():
        raise ExportError(f"{out} is the checkpoint being exported; choose another --out")
    output_file(out, "--out")
    output_file(sidecar_path(out), "--out (its sidecar)")


def _inputs(input_size: tuple[int, int]) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(n, 3, *input_size, generator=g) for n in CHECK_BATCHES}


def _compare(fmt: str, name: str, reference: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor]) -> dict:
    """The largest |export - PyTorch| over the check batches; an error past the tolerance."""
    scale = max(float(r.abs().max()) for r in reference.values())
    tol = RTOL * max(1.0, scale)
    diff = 0.0
    for n, ref in reference.items():
        out = outputs[n]
        same = tuple(out.shape) == tuple(ref.shape)
        d = float((out.float() - ref).abs().max()) if same else float("inf")
        if not d <= tol:  # NaN fails too
            what = f"max abs diff {d:.3g}" if same else f"logits {tuple(out.shape)}, PyTorch {tuple(ref.shape)}"
            raise ExportError(f"the {fmt} export of '{name}' differs from PyTorch at batch {n} ({what}; tolerance "
                              f"{tol:.3g}): its forward likely branches on its input, which a traced graph cannot "
                              "follow")
        diff = max(diff, d)
    return {"batch_sizes": list(CHECK_BATCHES), "max_abs_diff": diff, "tolerance": tol, "logit_scale": scale,
            "rtol": RTOL}


@contextlib.contextmanager
def _native_output_discarded():
    """File descriptors 1 and 2 sent to /dev/null: on failure the exporter's C++ side dumps its
    whole graph to the process's stdout (not through Python's sys.stdout), where the error is to
    be one line. Python's own output is untouched unless it writes to the descriptors."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _write_onnx(net: nn.Module, path: Path, example: torch.Tensor, opset: int, meta: dict) -> None:
    onnx, _ = import_extra("ONNX export", "onnx", "onnx", "onnxruntime")
    # The TorchScript-based exporter (dynamo=False), not the torch.export one: on kdcache's
    # networks (the demo pair, torchvision's FCN/DeepLabV3/LRASPP) both give graphs that match
    # PyTorch to ~1e-8, but this one exports much faster, needs no onnxscript and prints nothing
    # to stdout; the batch axis is dynamic by
    # dynamic_axes. The check after export catches a graph that does not match. It is deprecated
    # upstream: when torch drops it, pass dynamo=True, dynamic_shapes={"image": {0: Dim("batch")}}.
    with warnings.catch_warnings(), _native_output_discarded():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # SegModel's shape check: constant here
        try:
            torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        except Exception as exc:  # the exporter's own errors (an operator without an ONNX form, …)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export cannot export '{meta['model']}': {first}") from None
    graph = onnx.load(str(path))
    graph.metadata_props.add(key="kdcache", value=json.dumps(meta))
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _check_onnx(path: Path, name: str, num_classes: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    session = OnnxSegModel(path, name, num_classes)
    with torch.no_grad():
        return {n: session(x).logits for n, x in inputs.items()}


def _write_torchscript(net: nn.Module, path: Path, example: torch.Tensor, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream: asked for here
        traced = torch.jit.trace(net, (example,), check_trace=False)  # checked below, at two batch sizes
        torch.jit.save(traced, str(path), _extra_files={"kdcache.json": json.dumps(meta)})


def _check_torchscript(path: Path, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return {n: loaded(x) for n, x in inputs.items()}


def _safetensors_state(model: SegModel) -> dict[str, torch.Tensor]:
    # the wrapped network's state dict (what build_model(...).net loads), each tensor its own
    # contiguous copy: safetensors refuses tensors that share memory
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.net.state_dict().items()}


def _check_safetensors(data: bytes, weights: Weights, num_classes: int,
                       inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    (st,) = import_extra("safetensors export", "safetensors", "safetensors.torch")
    fresh = weights.build(num_classes=num_classes)  # then overwritten with the exported tensors
    fresh.net.load_state_dict(st.load(data), strict=True)
    with torch.no_grad():
        return {n: fresh(x).logits for n, x in inputs.items()}


def export_run(target: str | Path, fmt: str = "onnx", *, out: str | Path | None = None,
               input_size: tuple[int, int] | None = None, opset: int = DEFAULT_OPSET) -> dict:
    """Export the model of a run folder or checkpoint; returns the sidecar's contents plus ``path``.

    ``input_size``: (H, W) of the exported graph (default: the run's, :func:`run_input_size`).
    ``out``: the file (default :func:`default_path`); an existing file is replaced only if it is an
    earlier export. ``opset``: ONNX only. The file is written under a temporary name, checked
    (see the module docstring) and only then renamed into place, with ``<out>.json`` beside it."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be {', '.join(list(FORMATS)[:-1])} or {list(FORMATS)[-1]}, got {fmt!r}")
    if fmt == "onnx" and not OPSETS[0] <= opset <= OPSETS[1]:
        raise ExportError(f"--opset must be between {OPSETS[0]} and {OPSETS[1]} (what the TorchScript-based "
                          f"ONNX exporter writes), got {opset}")
    if fmt == "onnx":
        import_extra("ONNX export", "onnx", "onnx", "onnxruntime")
    elif fmt == "safetensors":
        (st,) = import_extra("safetensors export", "safetensors", "safetensors.torch")
    weights = open_weights(target)
    model = weights.build(device="cpu")
    num_classes = model.num_classes
    size = tuple(input_size) if input_size else run_input_size(weights)
    stride = [float(v) for v in model.stride()]  # the head's own, at its probe size (not this size's rounding)
    if size[0] < stride[0] or size[1] < stride[1]:
        given = "--input-size" if input_size else "the run's input size"
        raise ExportError(f"{given} {size[0]}x{size[1]} is smaller than the output stride "
                          f"({stride[0]:g}x{stride[1]:g}) of model '{model.name}': its logits would be one cell; "
                          "give --input-size HxW, the size it deploys at")
    path = Path(out) if out is not None else default_path(weights, fmt)
    _check_out(path, weights)

    net = LogitsOnly(model).eval()
    inputs = _inputs(size)
    with torch.no_grad():
        reference = {n: net(x) for n, x in inputs.items()}
    out_hw = tuple(reference[1].shape[-2:])
    class_names = weights.config.get("class_names")
    preprocess = weights.preprocess.to_dict()
    meta = {
        SIGNATURE: "export",
        "kdcache_export": __version__,
        "format": fmt,
        "file": path.name,
        "model": model.name,
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names else None,
        "checkpoint": str(weights.checkpoint),
        "checkpoint_sha256": weights.sha256(),
        "input": {"name": "image", "shape": ["batch", 3, *size], "dtype": "float32",
                  "layout": "NCHW RGB, (pixel / 255 - mean) / std"},
        "output": {"name": "logits", "shape": ["batch", num_classes, *out_hw], "dtype": "float32",
                   "meaning": "raw logits at the head's native stride: upsample bilinearly "
                              "(align_corners=False) to the wanted size, then argmax over classes"},
        "input_size": list(size),
        "output_stride": stride,
        "preprocess": {"mean": preprocess["mean"], "std": preprocess["std"], "resize": preprocess["resize"]},
        "opset": opset if fmt == "onnx" else None,
        "torch": torch.__version__,
    }

    tmp = temporary(path)
    try:
        if fmt == "onnx":
            _write_onnx(net, tmp, inputs[2], opset, meta)
            check = _compare(fmt, model.name, reference, _check_onnx(tmp, model.name, num_classes, inputs))
            check["runtime"] = "onnxruntime CPUExecutionProvider"
        elif fmt == "torchscript":
            _write_torchscript(net, tmp, inputs[2], meta)
            check = _compare(fmt, model.name, reference, _check_torchscript(tmp, inputs))
            check["runtime"] = "torch.jit.load"
        else:
            state = _safetensors_state(model)
            data = st.save(state, metadata={"format": "pt"})
            check = _compare(fmt, model.name, reference, _check_safetensors(data, weights, num_classes, inputs))
            check["runtime"] = "safetensors into a freshly built model"
        meta["check"] = check
        if fmt == "safetensors":  # metadata: str -> str only; the tensors are the ones just checked
            # written as bytes like every other file here (safetensors' save_file makes it 0600)
            tmp.write_bytes(st.save(state, metadata={"format": "pt", "kdcache": json.dumps(meta)}))
        meta["sha256"] = file_sha256(tmp)  # what tells this file as kdcache's (kdcache.core.outputs.own_file)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(sidecar_path(path), meta)
    return {**meta, "path": str(path)}
