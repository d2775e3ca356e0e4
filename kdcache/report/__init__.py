"""What a user reads and ships: metrics and latency of a model (``evaluation``), figures
(``figures``), the comparison of runs (``compare``) and its page (``page``), a model exported to
ONNX, safetensors or TorchScript (``export``) and the teacher's labels as files (``pseudo_labels``)."""
