"""Evaluation: metrics over a split, inference latency, and qualitative figures.

Predictions are made from logits bilinearly upsampled to the label's size (the preprocessed
size: native, or ``resize`` when the run used one); metrics follow mmsegmentation
(see :mod:`kdcache.core.metrics`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcache.core.errors import KDCacheError
from kdcache.core.metrics import ConfusionMatrix, TopK, per_image_iou
from kdcache.core.outputs import OutputFolder
from kdcache.core.progress import progress_bar
from kdcache.core.runs import BEST, RunDir, device_name, resolve_device, write_json
from kdcache.core.runs import KIND as RUN
from kdcache.data import build_dataset
from kdcache.data.splits import limit, train_val_sets
from kdcache.models import SegModel, count_parameters
from kdcache.models.loading import Weights, open_weights
from kdcache.models.onnx_session import OnnxSegModel
from kdcache.pipeline.loaders import make_loader
from kdcache.pipeline.transforms import SegPipeline
from kdcache.report import figures

#: the kind of output folder ``evaluate`` writes (:mod:`kdcache.core.outputs`), and its report
EVALUATION = "evaluation"
EVAL_JSON = "eval.json"


@dataclass
class EvalResult:
    metrics: dict
    #: (id, index, IoU), or for classification (id, index, the probability of the true class)
    per_image: list[tuple[str, int, float]] = field(default_factory=list)
    matrix: np.ndarray | None = None  # the confusion matrix [C, C] (rows: ground truth)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def evaluate_model(
    model: SegModel,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    device: torch.device,
    *,
    amp: bool = False,
    per_image: bool = False,
    description: str = "evaluate",
    show_progress: bool = True,
    ignore_index: int = 255,
) -> EvalResult:
    """Confusion-matrix metrics of ``model`` over ``loader`` (and per-image IoUs if asked).

    Classification (labels of 1 x 1, ``loader.dataset.classification``) adds top-1 and top-5
    accuracy; per image it records the probability the model gives the true class."""
    was_training = model.training
    model.eval()
    classification = bool(getattr(loader.dataset, "classification", False))
    if classification:
        ignore_index = loader.dataset.dataset.ignore_index
    cm = ConfusionMatrix(num_classes, ignore_index)
    topk = TopK((1, 5), ignore_index)
    ranked: list[tuple[str, int, float]] = []
    with progress_bar(description, total=len(loader.dataset), enabled=show_progress) as bar:
        for batch in loader:
            images, labels = batch["image"], batch["label"]
            if isinstance(images, torch.Tensor):
                groups = [(images, labels, batch["id"], batch["index"].tolist())]
            else:  # images of different sizes: one by one
                groups = [(im[None], lb[None], [i], [j]) for im, lb, i, j in
                          zip(images, labels, batch["id"], batch["index"].tolist())]
            for x, y, ids, idxs in groups:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if classification:
                    with _autocast(device, amp):
                        logits = model(x).logits.float().flatten(1)
                    target = y.reshape(-1)
                    cm.update(logits.argmax(1), target)
                    topk.update(logits, target)
                    if per_image:
                        p = torch.softmax(logits, 1).gather(1, target.clamp(min=0)[:, None])[:, 0]
                        ranked += [(ids[k], idxs[k], float(p[k])) for k in range(len(ids))]
                    bar.advance(len(ids))
                    continue
                with _autocast(device, amp):
                    pred = model.predict(x, size=tuple(y.shape[-2:]))
                cm.update(pred, y)
                if per_image:
                    for k in range(len(ids)):
                        ranked.append((ids[k], idxs[k], per_image_iou(pred[k], y[k], num_classes)))
                bar.advance(len(ids))
    cm.all_reduce()
    metrics = cm.compute()
    if classification:
        topk.all_reduce()
        metrics.update(topk.compute())
        metrics["task"] = "classification"
    model.train(was_training)
    return EvalResult(metrics, ranked, cm.matrix.cpu().numpy())


@torch.no_grad()
def measure_latency(
    model: torch.nn.Module, input_size: tuple[int, int], device: torch.device,
    *, warmup: int = 5, repeats: int = 30, amp: bool = False,
) -> dict:
    """Median wall time of one forward pass at batch 1 (warm-up first; CUDA synchronised).

    The model's forward only (to native-stride logits), as papers report it; the upsampling
    and argmax of a full prediction are not included."""
    return measure_latencies([model], [input_size], device, warmup=warmup, rounds=1, repeats=repeats,
                             amp=[amp])[0]


def measure_latencies(
    models: list[torch.nn.Module], input_sizes: list[tuple[int, int]], device: torch.device,
    *, warmup: int = 5, rounds: int = 5, repeats: int = 6, amp: list[bool] | None = None,
) -> list[dict]:
    """:func:`measure_latency` of several models, interleaved: after each model's warm-up,
    ``rounds`` rounds in each of which every model (in an order that rotates from round to
    round) runs ``repeats`` timed forwards. A noisy machine's slow spells then fall on every
    model alike, so the medians compare."""
    amp = amp or [False] * len(models)
    inputs = [torch.randn(1, 3, *size, device=device) for size in input_sizes]

    def once(i: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with _autocast(device, amp[i]):
            models[i](inputs[i])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1000.0

    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for i, model in enumerate(models):
            model.eval()
            for _ in range(warmup):
                once(i)
        for r in range(rounds):
            for j in range(len(models)):
                i = (j + r) % len(models)
                times[i] += [once(i) for _ in range(repeats)]
    out = []
    for i, t in enumerate(times):
        ms = statistics.median(t)
        q = statistics.quantiles(t, n=4) if len(t) >= 4 else [ms, ms, ms]
        out.append({"ms_per_image": ms, "ms_iqr": [q[0], q[2]], "fps": 1000.0 / ms, "batch_size": 1,
                    "input_size": list(input_sizes[i]), "repeats": len(t), "rounds": rounds,
                    "device": device_name(device)})
    return out


def eval_dataset(config: dict, *, dataset: str | None = None, data_root: str | None = None,
                 split: str | None = None, limit_n: int | None = None):
    """(config, data set, split name) to evaluate a run on: its own validation part (split or
    held-out fold) by default, or ``dataset``/``split``."""
    config = dict(config)
    if dataset is not None and dataset != config.get("dataset"):
        # another data set: keep the run's model and preprocessing, drop its splits
        config = {**config, "dataset": dataset, "data_root": data_root, "dataset_options": {},
                  "folds": None, "limit": None, "train_split": "train", "val_split": "val"}
    config.setdefault("dataset", "synthetic")
    if data_root is not None:
        config["data_root"] = data_root
    if split is None:
        # the run's own validation part (its folds are rebuilt with the run's own limit)
        _, ds, split_name = train_val_sets(
            config["dataset"], data_root=config.get("data_root"),
            dataset_options=config.get("dataset_options"), train_split=config.get("train_split", "train"),
            val_split=config.get("val_split", "val"), folds=config.get("folds"), fold=config.get("fold", 0),
            seed=config.get("split_seed", 0), limit_n=config.get("limit"),
        )
        ds = limit(ds, limit_n)
    else:
        split_name = split
        ds = build_dataset(config["dataset"], split, config.get("data_root"), **config.get("dataset_options", {}))
        ds = limit(ds, limit_n if limit_n is not None else config.get("limit"))
    if len(ds) == 0:
        raise KDCacheError(f"split '{split_name}' of {config['dataset']} is empty")
    ds.require_labels("evaluation")
    return config, ds, split_name


def evaluate_run(
    target: str | Path | Weights,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
    split: str | None = None,
    limit_n: int | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str = "auto",
    qualitative: int = 8,
    out: str | Path | None = None,
    latency: bool = True,
    show_progress: bool = True,
    onnx: str | Path | None = None,
    save: bool = True,
    keep_model: bool = False,
) -> dict:
    """Evaluate a run folder or checkpoint; write ``eval.json`` and figures into ``out``.

    The data set, split, folds and preprocessing default to the run's own (its validation
    part); a bare checkpoint without a run folder needs ``dataset`` (synthetic by default).
    ``onnx``: an export of these weights (``kdcache export``) that ONNX Runtime runs for the
    metrics, latency and figures in place of the PyTorch model (``backend: onnxruntime``).
    ``out`` defaults to the run's ``eval`` folder (``eval-<split>`` for another split,
    ``eval-<checkpoint>`` for a checkpoint other than best.pt): evaluations of other splits or
    checkpoints never replace each other, and the report's ``replaced`` says when an earlier
    evaluation in the same folder was. ``save=False`` writes nothing (``compare`` keeps its own
    outputs) and needs no ``out``; with ``keep_model`` its report holds the model it evaluated under
    ``"model_object"`` (not JSON: ``compare`` takes it out to time and draw with, instead of
    building it again). ``target`` may be weights already read (:func:`open_weights`).
    """
    dev = resolve_device(device)
    weights = target if isinstance(target, Weights) else open_weights(target)
    ckpt_path, run_dir = weights.checkpoint, weights.run_dir
    out_dir = None
    if save:  # a folder of anyone else's is refused before the evaluation runs
        out_dir = Path(out) if out is not None else default_eval_dir(ckpt_path, run_dir, split, dataset)
        OutputFolder.check(out_dir, EVALUATION)
    config, ds, split_name = eval_dataset(weights.config, dataset=dataset, data_root=data_root, split=split,
                                          limit_n=limit_n)
    model = weights.build(num_classes=ds.num_classes, device=dev, class_names=ds.class_names)
    model_name = model.name
    preprocess = weights.preprocess
    pipeline = SegPipeline(ds, preprocess)
    classification = pipeline.classification
    # a batch of more images than there are is all of them (the sampler takes no size past sys.maxsize)
    loader = make_loader(pipeline, min(batch_size, max(len(pipeline), 1)), workers, pin_memory=dev.type == "cuda")
    amp = bool(config.get("amp_enabled", False))
    params = count_parameters(model)
    if onnx is not None:  # the deployed graph in place of the PyTorch model, on ONNX Runtime's device
        model = OnnxSegModel(onnx, model_name, ds.num_classes, dev)
        dev, amp = model.device, False
    result = evaluate_model(model, loader, ds.num_classes, dev, amp=amp, per_image=qualitative > 0,
                            description=f"evaluate {split_name}", show_progress=show_progress)
    m = result.metrics
    report = {
        "checkpoint": str(ckpt_path),
        "model": model_name,
        "dataset": config["dataset"],
        "split": split_name,
        "num_samples": len(ds),
        "class_names": list(ds.class_names),
        "params": params,
        "backend": "onnxruntime" if onnx is not None else "torch",
        "task": "classification" if classification else "segmentation",
        **m,
    }
    if onnx is not None:
        report["onnx"] = {"file": str(onnx), "provider": model.provider}
    report["input_size"] = list(pipeline[0]["image"].shape[-2:])
    if latency:
        report["latency"] = measure_latency(model, tuple(report["input_size"]), dev, amp=amp)

    if not save:
        _keep_in_memory(report, result, classification, qualitative)
        if keep_model:
            report["model_object"] = model
        return report
    folder = OutputFolder.claim(out_dir, EVALUATION)
    report["replaced"] = folder.owns(EVAL_JSON)
    folder.remove(keep=[EVAL_JSON])  # the figures of an earlier evaluation here (never anyone else's files)
    if classification:
        _classification_figures(report, result, pipeline, model, dev, amp, folder, qualitative,
                                f"{model_name} on {config['dataset']} {split_name}")
    elif qualitative > 0 and result.per_image:
        ranked = sorted((r for r in result.per_image if not math.isnan(r[2])), key=lambda r: -r[2])
        report["per_image_iou"] = {r[0]: r[2] for r in result.per_image}
        n = min(qualitative, len(ranked) // 2 if len(ranked) > 1 else 1)
        picks = [("best", k + 1, r) for k, r in enumerate(ranked[:n])]
        picks += [("worst", k + 1, r) for k, r in enumerate(ranked[::-1][:n])]
        model.eval()
        for kind, rank, (sid, idx, iou) in picks:
            item = pipeline[idx]
            with torch.no_grad(), _autocast(dev, amp):
                pred = model.predict(item["image"][None].to(dev), size=tuple(item["label"].shape))[0]
            figures.save_sample_panel(
                folder.file(f"{kind}/{kind}{rank:02d}_{sid}_iou{iou:.3f}.png"),
                preprocess.denormalize(item["image"]),
                item["label"].numpy().astype(np.uint8),
                pred.cpu().numpy().astype(np.uint8),
                ds.palette, list(ds.class_names),
                title=f"{sid} ({kind} #{rank}) — image IoU {iou:.3f}",
            )
        figures.save_iou_histogram(folder.file("iou_histogram.png"), [r[2] for r in result.per_image],
                                     title=f"{model_name} on {config['dataset']} {split_name}")
    write_json(folder.file(EVAL_JSON), report)
    report["out_dir"] = str(out_dir)
    if run_dir is not None and OutputFolder.is_own(run_dir, RUN):  # the run's own log, if the run is kdcache's
        # what was evaluated, with the images it saw: a --limit's few are not the split's score
        RunDir(run_dir).log({"event": "evaluate", "dataset": config["dataset"], "split": split_name,
                             "num_samples": len(ds), **({"limit": limit_n} if limit_n is not None else {}),
                             "backend": report["backend"], "miou": m["miou"], "macc": m["macc"], "aacc": m["aacc"],
                             "checkpoint": ckpt_path.name, "out": str(out_dir),
                             **({"top1": m["top1"], "top5": m["top5"]} if classification else {})})
    return report


def default_eval_dir(ckpt_path: Path, run_dir: Path | None, split: str | None, dataset: str | None) -> Path:
    """Where ``evaluate`` writes by default: RUN/eval for best.pt on the run's own validation
    part, with ``-<checkpoint>`` for another checkpoint and ``-<data set>-<split>`` or
    ``-<split>`` for other images (a bare checkpoint: ``<stem>-eval…`` beside it)."""
    parts = [] if ckpt_path.name == BEST or run_dir is None else [ckpt_path.stem]
    parts += [p for p in (dataset, split) if p]
    if run_dir is not None:
        return run_dir / "-".join(["eval", *parts])
    return ckpt_path.parent / "-".join([ckpt_path.stem, "eval", *parts])


def _keep_in_memory(report: dict, result: EvalResult, classification: bool, qualitative: int) -> None:
    """What a saved evaluation would add to the report for its figures, without writing any."""
    if not result.per_image:
        return
    if classification:
        report["per_image_prob"] = {r[0]: r[2] for r in result.per_image}
        if len(report["class_names"]) <= 100:
            report["confusion_matrix"] = result.matrix.tolist()
    elif qualitative > 0:
        report["per_image_iou"] = {r[0]: r[2] for r in result.per_image}


def class_caption(class_names, truth: int, pred: int, prob: float) -> str:
    """A prediction as a caption line: '✓ name (p)' or '✗ name (p)'."""
    return f"{'✓' if pred == truth else '✗'} {class_names[pred]} ({prob:.2f})"


@torch.no_grad()
def _classification_figures(report: dict, result: EvalResult, pipeline, model, dev, amp: bool,
                            folder: OutputFolder, qualitative: int, title: str) -> None:
    """Classification: the confusion matrix, and the images the model is surest and least sure
    of being right about (by the probability of the true class), with its predictions."""
    names = list(pipeline.dataset.class_names)
    report["per_image_prob"] = {r[0]: r[2] for r in result.per_image}
    if len(names) <= 100:
        report["confusion_matrix"] = result.matrix.tolist()
    figures.save_confusion_matrix(folder.file("confusion_matrix.png"), result.matrix, names, title=title)
    if qualitative <= 0 or not result.per_image:
        return
    ranked = sorted(result.per_image, key=lambda r: -r[2])
    n = min(qualitative, max(1, len(ranked) // 2))
    model.eval()
    for kind, picks in (("best", ranked[:n]), ("worst", ranked[::-1][:n])):
        images, captions = [], []
        for sid, idx, _p in picks:
            item = pipeline[idx]
            with _autocast(dev, amp):
                logits = model(item["image"][None].to(dev)).logits.float().flatten(1)[0]
            prob = torch.softmax(logits, 0)
            pred, truth = int(prob.argmax()), int(item["label"].reshape(-1)[0])
            images.append(pipeline.preprocess.denormalize(item["image"]))
            captions.append([f"{sid}: {names[truth]}", class_caption(names, truth, pred, float(prob[pred]))])
        figures.save_class_examples(folder.file(f"{kind}.png"), images, captions,
                                      title=f"{title}: {kind} {n} by the probability of the true class")
