"""The run folder: ``config.json``, ``metrics.jsonl`` and checkpoints, one folder per run."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from kdcache.core.errors import KDCacheError
from kdcache.core.outputs import OutputFolder, temporary

CONFIG = "config.json"
METRICS = "metrics.jsonl"
BEST = "best.pt"
LAST = "last.pt"
CURVES = "curves.png"
#: the files a run writes at its top level (TensorBoard's and W&B's files go in their sub-folders)
RUN_FILES = (CONFIG, METRICS, BEST, LAST, CURVES)
#: the kind of output folder a run is (:mod:`kdcache.core.outputs`)
KIND = "run"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, written under a temporary name and renamed into place."""
    tmp = temporary(path)
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def legacy_run_files(path: Path) -> list[str] | None:
    """The files of a run folder an earlier kdcache wrote without :data:`~kdcache.core.outputs.MARKER`
    (its config.json records a ``kdcache_version``); None for any other folder."""
    try:
        config = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "kdcache_version" not in config:
        return None
    return [name for name in RUN_FILES if (Path(path) / name).is_file()]


class RunDir:
    """A run folder. ``config.json`` is the resolved configuration; ``metrics.jsonl`` one JSON
    object per line (one per epoch and evaluation); ``best.pt`` / ``last.pt`` the checkpoints."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def last(self) -> Path:
        return self.path / LAST

    def exists(self) -> bool:
        return self.config_path.exists()

    def check(self) -> OutputFolder | None:
        """None for a new or empty folder, the run folder of kdcache's that is there, else one error
        (:mod:`kdcache.core.outputs`); changes nothing."""
        return OutputFolder.check(self.path, KIND, legacy=legacy_run_files)

    def check_new(self, *, overwrite: bool = False) -> OutputFolder | None:
        """Whether a new run may start here, before any work: :meth:`check`, and a run with a
        ``last.pt`` needs ``overwrite``."""
        found = self.check()
        if found is not None and found.owns(LAST) and self.last.exists() and not overwrite:
            raise KDCacheError(
                f"run folder {self.path} already holds a run; use --resume to continue it, "
                "--overwrite to start it again, or another --out"
            )
        return found

    def create(self, config: dict, *, overwrite: bool = False) -> OutputFolder:
        """Start a run here. A folder with a run in it is refused unless ``overwrite``, which
        replaces only the files the run wrote; a run that stopped before its first checkpoint has
        nothing to keep and is started again. A folder that is not kdcache's is refused."""
        self.check_new(overwrite=overwrite)
        folder = self.folder()
        folder.remove()
        folder.paths(RUN_FILES)
        write_json(self.config_path, config)
        return folder

    def folder(self) -> OutputFolder:
        """The run folder as kdcache's output (made if new; a folder of anyone else's is refused)."""
        return OutputFolder.claim(self.path, KIND, legacy=legacy_run_files)

    def file(self, name: str) -> Path:
        """A file of the run (recorded as kdcache's; a file of anyone else's there is refused)."""
        return self.folder().file(name)

    def read_config(self) -> dict:
        if not self.exists():
            raise KDCacheError(f"{self.path} is not a kdcache run folder (no {CONFIG})")
        return json.loads(self.config_path.read_text())

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def read_metrics(self) -> list[dict]:
        """The records; a last line cut short by a crash mid-write is dropped."""
        if not self.metrics_path.exists():
            return []
        records = []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k != len(lines) - 1:
                    raise KDCacheError(f"{self.metrics_path} line {k + 1} is not JSON; fix or delete that "
                                       "line") from None
        return records

    def truncate_metrics(self, after_epoch: int) -> None:
        """Drop epoch records past ``after_epoch`` (a resumed run redoes those epochs)."""
        kept = [r for r in self.read_metrics() if r.get("epoch") is None or r["epoch"] <= after_epoch]
        tmp = temporary(self.metrics_path)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics_path)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KDCacheError(f"--device '{device}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KDCacheError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise KDCacheError(f"--device {device}: kdcache runs on cpu or cuda")
    return dev


def device_name(device: torch.device) -> str:
    """A human name for ``device``, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu: <model> (2 threads)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """The device as a results file names it: ``cpu``, or the GPU's name in lower case with dashes
    (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def resolve_run(path: str | Path) -> tuple[Path, dict | None, Path | None]:
    """(checkpoint, run config or None, run folder or None) for a run folder or checkpoint.

    A run folder gives its ``best.pt`` (else ``last.pt``) and its ``config.json``; a checkpoint
    file inside a run folder gives that folder's config too."""
    path = Path(path)
    if not path.exists():
        raise KDCacheError(f"{path} does not exist; give a run folder (from train-teacher) or a checkpoint file")
    if path.is_dir():
        run = RunDir(path)
        config = run.read_config()
        for name in (BEST, LAST):
            if (path / name).exists():
                return path / name, config, path
        raise KDCacheError(f"run folder {path} has no checkpoint yet ({BEST} or {LAST})")
    run_dir = path.parent if (path.parent / CONFIG).exists() else None
    config = RunDir(run_dir).read_config() if run_dir else None
    return path, config, run_dir



def checkout_commit(where: str | Path | None = None) -> str:
    """The short commit of the git checkout at ``where`` (default: the working folder), for a
    results file: ``KDCACHE_COMMIT`` when set (a copied tree whose .git is another commit's, as a
    GPU machine's copy is), "" when it is not a git checkout."""
    if os.environ.get("KDCACHE_COMMIT"):
        return os.environ["KDCACHE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=where).stdout.strip()
    except OSError:
        return ""
