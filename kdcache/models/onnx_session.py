"""An exported ONNX model run by ONNX Runtime, as a :class:`SegModel`.

``kdcache export RUN --format onnx`` writes a graph whose one input ``image`` is [N, 3, H, W]
(normalised RGB, a fixed H x W, any N) and whose one output ``logits`` is [N, C, h, w] at the
head's native stride. :class:`OnnxSegModel` runs such a file where evaluation runs a PyTorch
model (``evaluate --backend onnxruntime``): the same metrics code, the same upsampling and
argmax in ``predict``, the same latency loop, so the numbers are those of the deployed graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdcache.core.errors import ExportError, import_extra
from kdcache.models.wrapper import SegModel


class OnnxSegModel(SegModel):
    """``path`` (an ONNX file) in an ONNX Runtime session; ``forward`` returns its logits.

    It runs with the CUDA execution provider when ``device`` is a CUDA device and this
    onnxruntime has it, else on the CPU (``self.device`` says which, ``self.provider`` names it).
    Inputs are copied to the host and the logits back to the input's device."""

    def __init__(self, path: str | Path, name: str, num_classes: int, device: torch.device | str = "cpu"):
        super().__init__(nn.Identity(), name, num_classes)
        # imported here, not at start-up: onnxruntime is an optional extra (see import_extra)
        (ort,) = import_extra("the onnxruntime backend", "onnx", "onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path} does not exist; export one with kdcache export RUN --format onnx")
        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"cannot load {self.path} with ONNX Runtime: {first}") from None
        self.provider = self.session.get_providers()[0]
        self.device = device if self.provider == "CUDAExecutionProvider" else torch.device("cpu")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_hw = tuple(inp.shape[2:]) if len(inp.shape) == 4 else ()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        hw = tuple(x.shape[-2:])
        fixed = all(isinstance(s, int) for s in self.input_hw) and len(self.input_hw) == 2
        if fixed and hw != self.input_hw:
            h, w = self.input_hw
            raise ExportError(f"{self.path} takes {h}x{w} inputs but got {hw[0]}x{hw[1]}: export it at this size "
                              f"(kdcache export RUN --input-size {hw[0]}x{hw[1]}) or evaluate images of its size")
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)
