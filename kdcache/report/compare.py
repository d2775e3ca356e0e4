"""``compare``: several runs side by side — a KD study's results table in one command, plus figures.

Every run is evaluated on the same images: by default each run's own validation part (they
must agree), or with ``split`` (e.g. ``test``) that split, always with each run's best
checkpoint, the one chosen on validation. The result is one table (method, mIoU, mAcc, aAcc,
per-class IoU, #params, ms/image, FPS, Δ mIoU against the baseline) printed with rich and written
as Markdown, CSV and JSON, a per-class IoU bar chart, and side-by-side figures (image, ground
truth, each run's prediction) of the images where the runs do best and worst on average.

Latency is measured once per architecture (model, parameter count, input size): runs of the
same network share one measurement, and the networks are timed interleaved, in rounds, so that
a noisy machine's slow spells fall on all of them alike.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from kdcache.core.errors import KDCacheError
from kdcache.core.outputs import OutputFolder
from kdcache.core.runs import RunDir, resolve_device, write_json
from kdcache.models.loading import open_weights
from kdcache.pipeline.transforms import SegPipeline
from kdcache.report import figures, page
from kdcache.report.evaluation import class_caption, eval_dataset, evaluate_run, measure_latencies
from kdcache.store import CacheStore

#: the kind of output folder ``compare`` writes (:mod:`kdcache.core.outputs`)
COMPARISON = "comparison"

#: how a student read its targets (``cache_targets`` in its config.json), as the table names it
TARGET_LABELS = {"views": "stored views", "label_map": "label map", "schedule": "every epoch's crops"}


def run_label(config: dict, path: Path) -> str:
    """What a run is, for the table: its KD methods (and, where the cache gives targets other
    than its logits, which: stored views, a label map), or 'CE' for supervised training."""
    if config.get("kind") == "distill":
        names = [m["name"] for m in config.get("methods", [])]
        methods = "+".join(names) if names else "?"
        pool = config.get("unlabeled_caches")
        if methods == "none":
            methods = "CE + unlabelled caches" if pool else "CE (baseline)"
        else:
            if pool:
                methods += " + unlabelled"
            if config.get("online_teacher"):
                methods += " (online teacher)"
            elif config.get("cache_targets") in TARGET_LABELS:
                methods += f" ({TARGET_LABELS[config['cache_targets']]})"
        return methods
    return "CE"


def compare_runs(runs: list[str | Path], *, baseline: str | Path | None = None, out: str | Path = "runs/compare",
                 split: str | None = None, examples: int = 3, latency: bool = True, device: str = "auto",
                 batch_size: int = 8, show_progress: bool = True, onnx: list[str | Path] | None = None,
                 page_images: int = 40, data_root: str | Path | None = None) -> dict:
    """``onnx``: one exported ONNX file per run (``kdcache export``): metrics, latency and
    figures come from ONNX Runtime running them, as deployed (``backend: onnxruntime``).
    ``page_images``: the images ``index.html`` browses (all of them when there are no more, else
    those where the runs' per-image IoU differ most; classification: the wrong ones shown per run);
    0 writes the page without them. ``data_root``: evaluate every run on the images under it (runs
    whose own data roots differ are refused without it: each would be scored on other images)."""
    if not runs:
        raise KDCacheError("give at least one run folder to compare")
    paths = [Path(r) for r in runs]
    if onnx is not None and len(onnx) != len(paths):
        raise KDCacheError(f"give one ONNX file per run: {len(onnx)} files for {len(paths)} runs")
    for p in paths:
        if not (p / "config.json").exists():
            raise KDCacheError(f"{p} is not a run folder (no config.json); compare takes run folders")
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise KDCacheError(f"{seen[p.resolve()]} is given twice{f' (as {p})' if str(p) != str(seen[p.resolve()]) else ''}; "
                               "give each run once")
        seen[p.resolve()] = p
    OutputFolder.check(out, COMPARISON)  # a folder of anyone else's is refused before any run is evaluated
    _check_same_data(paths)
    if data_root is None:
        roots = {}
        for p in paths:
            root = RunDir(p).read_config().get("data_root")
            roots.setdefault(None if root is None else str(Path(root).expanduser().resolve()), p)
        if len(roots) > 1:
            (a, pa), (b, pb) = list(roots.items())[:2]
            raise KDCacheError(f"{pa} was trained on the data under {a} and {pb} under {b}: each would be scored on "
                               "other images; give --data-root DIR to evaluate every run on the same ones")
    weights = [open_weights(p) for p in paths]  # each checkpoint read once
    # each run's model as its evaluation built it (or ran it: ONNX Runtime), for the latencies and figures
    reports = [evaluate_run(w, split=split, qualitative=1, latency=False, device=device, batch_size=batch_size,
                            show_progress=show_progress, onnx=onnx[i] if onnx else None, save=False,
                            data_root=None if data_root is None else str(data_root), keep_model=True)
               for i, w in enumerate(weights)]
    built = [rep.pop("model_object") for rep in reports]
    first = reports[0]
    for p, rep in zip(paths, reports):
        if (rep["dataset"], rep["split"], rep["num_samples"], rep["class_names"]) != (
                first["dataset"], first["split"], first["num_samples"], first["class_names"]):
            raise KDCacheError(f"{p} was evaluated on {rep['dataset']} '{rep['split']}' ({rep['num_samples']} "
                               f"images) but {paths[0]} on {first['dataset']} '{first['split']}' "
                               f"({first['num_samples']}); compare runs on the same images (data set, split and --limit)")
    dev = resolve_device(device)
    models = built if (latency or examples > 0 or page_images > 0) else []
    lat = _shared_latencies(models, weights, reports, dev) if latency else [{} for _ in paths]
    configs = [RunDir(p).read_config() for p in paths]
    labels = [run_label(c, p) for c, p in zip(configs, paths)]
    base_i = _baseline_index(paths, configs, baseline)
    teacher_i = _teacher_index(paths, configs, weights)
    classification = first.get("task") == "classification"
    rows = []
    for i, (p, rep) in enumerate(zip(paths, reports)):
        rows.append({
            "run": str(p), "name": p.name, "method": labels[i], "model": rep["model"],
            "miou": rep["miou"], "macc": rep["macc"], "aacc": rep["aacc"],
            "delta_miou": None if base_i is None else rep["miou"] - reports[base_i]["miou"],
            "params": rep["params"], "ms_per_image": lat[i].get("ms_per_image"), "fps": lat[i].get("fps"),
            "latency_group": lat[i].get("group"), "iou": rep["iou"], "acc": rep["acc"], "baseline": i == base_i,
            "per_image_iou": rep.get("per_image_iou", {}),
            "teacher": i == teacher_i,
            **({"top1": rep["top1"], "top5": rep["top5"],
                "delta_top1": None if base_i is None else rep["top1"] - reports[base_i]["top1"]}
               if classification else {}),
        })
    folder = OutputFolder.claim(out, COMPARISON)
    folder.remove()  # what an earlier comparison wrote here is written again (never anyone else's files)
    out_dir = folder.path
    class_names = first["class_names"]
    result = {"rows": rows, "class_names": class_names, "dataset": first["dataset"], "split": first["split"],
              "split_given": split is not None, "num_samples": first["num_samples"],
              "baseline": None if base_i is None else str(paths[base_i]),
              "latency_device": next((x["device"] for x in lat if x), None),
              "latency_rounds": next((x["rounds"] for x in lat if x), None),
              "backend": "onnxruntime" if onnx else "torch", "task": first.get("task", "segmentation"),
              "teacher": None if teacher_i is None else str(paths[teacher_i])}
    result["per_class"] = per_class_view(result)
    write_json(folder.file("compare.json"), result)
    folder.file("compare.md").write_text(markdown_table(result) + "\n" + per_class_markdown(result))
    _write_csv(folder.file("compare.csv"), result)
    _write_per_class_csv(folder.file("compare_per_class.csv"), result)
    if classification:
        figures.save_per_class_bars(folder.file("per_class_acc.png"), class_names,
                                      {f"{r['name']} ({r['method']})": r["acc"] for r in rows},
                                      title=f"per-class accuracy on {first['dataset']} {first['split']}",
                                      ylabel="accuracy (%)")
        for r, rep in zip(rows, reports):
            if rep.get("confusion_matrix") is not None:
                figures.save_confusion_matrix(folder.file(f"confusion_{r['name']}.png"), rep["confusion_matrix"],
                                                class_names, title=f"{r['name']} ({r['method']})")
        result["figures"] = _class_examples(paths, reports, weights, models, split, folder, examples, dev)
    else:
        figures.save_per_class_bars(folder.file("per_class_iou.png"), class_names,
                                      {f"{r['name']} ({r['method']})": r["iou"] for r in rows},
                                      title=f"per-class IoU on {first['dataset']} {first['split']}")
        result["figures"] = _example_figures(paths, labels, reports, weights, models, split, folder, examples,
                                             dev)
    if classification:
        wrong = _wrong_images(paths, weights, models, split, folder, page_images, dev) if models else {}
        page.write_page(folder, result, wrong=wrong)
    else:
        images = _browse_images(paths, reports, weights, models, split, page_images, dev) if models else []
        palette = eval_dataset(weights[0].config, split=split)[1].palette
        page.write_page(folder, result, images=page.browser_images(folder, result, images, palette),
                        palette=palette)
    result["page"] = str(out_dir / "index.html")
    result["out_dir"] = str(out_dir)
    return result


def _check_same_data(paths: list[Path]) -> None:
    """Runs of another data set (its name or its classes) cannot be scored on the same images, whatever
    the data root: refused in one line naming the two runs."""
    configs = [RunDir(p).read_config() for p in paths]

    def data(c: dict) -> tuple:
        names = c.get("class_names")
        return c.get("dataset"), c.get("num_classes", len(names) if names else None), tuple(names or ())

    for p, c in zip(paths[1:], configs[1:]):
        (da, na, ca), (db, nb, cb) = data(configs[0]), data(c)
        if da != db or na != nb or (ca and cb and ca != cb):
            what = (f"the data set {da!r} ({na} classes) and {p} on {db!r} ({nb} classes)" if (da, na) != (db, nb)
                    else f"{da!r} with the classes {', '.join(ca)} and {p} with {', '.join(cb)}")
            raise KDCacheError(f"{paths[0]} was trained on {what}: runs of different data sets or classes cannot be "
                               "scored on the same images (no --data-root changes that); compare runs of one data set")


@torch.no_grad()
def _browse_images(paths, reports, weights, models, split, n: int, device) -> list[dict]:
    """The images the page browses (all of them when there are at most ``n``, else the ``n`` whose
    per-image IoU differ most between the runs), each with every run's prediction."""
    if n <= 0:
        return []
    per_image = [rep.get("per_image_iou", {}) for rep in reports]
    ids = [i for i in per_image[0] if all(i in p for p in per_image)]
    spread = {i: np.nan_to_num(np.nanmax([p[i] for p in per_image]) - np.nanmin([p[i] for p in per_image]))
              if not all(math.isnan(p[i]) for p in per_image) else 0.0 for i in ids}
    picked = ids if len(ids) <= n else sorted(sorted(ids, key=lambda i: -spread[i])[:n])
    _, ds, _ = eval_dataset(weights[0].config, split=split)
    pre = weights[0].preprocess
    pipe = SegPipeline(ds, pre)
    index = {sid: j for j, sid in enumerate(ds.ids)}
    out = []
    for sid in picked:
        item = pipe[index[sid]]
        x = item["image"][None].to(device)
        size = tuple(item["label"].shape)
        preds = {p.name: m.predict(x, size=size)[0].cpu().numpy().astype(np.uint8) for m, p in zip(models, paths)}
        out.append({"id": sid, "image": pre.denormalize(item["image"]), "label": item["label"].numpy(),
                    "preds": preds})
    return out


@torch.no_grad()
def _wrong_images(paths, weights, models, split, folder: OutputFolder, n: int, device) -> dict[str, list[dict]]:
    """Classification: per run, up to ``n`` test images it gets wrong (thumbnails in ``browse/``),
    each captioned with the true class, the prediction and its probability."""
    if n <= 0:
        return {}
    _, ds, _ = eval_dataset(weights[0].config, split=split)
    pipe = SegPipeline(ds, weights[0].preprocess)
    names = list(ds.class_names)
    out: dict[str, list[dict]] = {p.name: [] for p in paths}
    for j in range(len(ds)):
        if all(len(v) >= n for v in out.values()):
            break
        item = pipe[j]
        truth = int(item["label"].reshape(-1)[0])
        thumb = None
        for model, p in zip(models, paths):
            if len(out[p.name]) >= n:
                continue
            prob = torch.softmax(model(item["image"][None].to(device)).logits.float().flatten(1)[0], 0)
            pred = int(prob.argmax())
            if pred != truth:
                if thumb is None:
                    thumb = f"browse/wrong_{j:05d}.png"
                    page.save_picture(folder.file(thumb), weights[0].preprocess.denormalize(item["image"]))
                out[p.name].append({"file": thumb, "caption": f"{ds.ids[j]}: {class_caption(names, truth, pred, float(prob[pred]))}"})
    return out


def _shared_latencies(models, weights, reports, device) -> list[dict]:
    """One interleaved measurement per architecture (model name, parameter count, input size,
    AMP), shared by every run of it; each entry names its group (the first run's index)."""
    groups: dict[tuple, int] = {}
    of_run = []
    for i, rep in enumerate(reports):
        key = (rep["model"], rep["params"], tuple(rep["input_size"]), bool(weights[i].config.get("amp_enabled")))
        of_run.append(groups.setdefault(key, i))
    firsts = sorted(groups.values())
    measured = measure_latencies([models[i] for i in firsts], [tuple(reports[i]["input_size"]) for i in firsts],
                                 device, amp=[bool(weights[i].config.get("amp_enabled")) for i in firsts])
    by_first = dict(zip(firsts, measured))
    return [{**by_first[g], "group": g} for g in of_run]


def _baseline_index(paths, configs, baseline) -> int | None:
    if baseline is not None:
        b = Path(baseline).resolve()
        for i, p in enumerate(paths):
            if p.resolve() == b:
                return i
        raise KDCacheError(f"--baseline {baseline} is not one of the compared runs")
    for i, c in enumerate(configs):
        if (c.get("kind") == "distill" and [m["name"] for m in c.get("methods", [])] == ["none"]
                and not c.get("unlabeled_caches")):
            return i
    return None


def _teacher_index(paths, configs, weights) -> int | None:
    """The run among ``paths`` that is the teacher of the compared students: a run that is not a
    student and whose weights file is the one their caches record (by SHA-256), else None."""
    recorded = set()
    for c in configs:
        if c.get("kind") == "distill" and c.get("cache"):
            try:
                schema = CacheStore(c["cache"]).schema
            except (KDCacheError, OSError):
                continue  # a cache moved or deleted since: its teacher cannot be named
            ens = schema.meta.get("ensemble") or {}
            recorded |= {m.get("weights_sha256") for m in ens.get("members", [])}
            recorded.add((schema.meta.get("teacher") or {}).get("weights_sha256"))
    recorded.discard(None)
    for i, c in enumerate(configs):
        if c.get("kind") != "distill" and recorded and weights[i].sha256() in recorded:
            return i
    return None


def class_key(result: dict) -> tuple[str, str]:
    """The per-class score of the task: ``("iou", "IoU")``, or ``("acc", "accuracy")`` for classification."""
    return ("acc", "accuracy") if result.get("task") == "classification" else ("iou", "IoU")


def per_class_view(result: dict) -> list[dict]:
    """Where distillation helps and hurts, per class: for each class the teacher's score and the
    baseline's (None where that run is not among the compared ones), each other run's difference
    to the baseline (None without a baseline), and whether the teacher is below the baseline there
    (the classes where a student may copy the teacher's mistakes)."""
    key, _ = class_key(result)
    rows = result["rows"]
    base = next((r for r in rows if r["baseline"]), None)
    teacher = next((r for r in rows if r.get("teacher")), None)
    students = [r for r in rows if not r["baseline"] and not r.get("teacher")]
    out = []
    for c, name in enumerate(result["class_names"]):
        t = None if teacher is None else teacher[key][c]
        b = None if base is None else base[key][c]
        delta = {r["name"]: (None if b is None or _missing(r[key][c]) or _missing(b) else r[key][c] - b)
                 for r in students}
        below = None if t is None or b is None or _missing(t) or _missing(b) else bool(t < b)
        out.append({"class": name, "teacher": t, "baseline": b, "delta": delta, "teacher_below_baseline": below})
    return out


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def notable_classes(result: dict, points: float = 1.0, worst: int = 5) -> list[int]:
    """The classes worth a look in a narrow view: those where any run differs from the baseline by
    more than ``points``, or where the teacher is below it; without a baseline, the ``worst``
    classes of the mean score."""
    view = result["per_class"]
    if not any(r["baseline"] for r in result["rows"]):
        key, _ = class_key(result)
        mean = [np.nanmean([r[key][c] for r in result["rows"]]) for c in range(len(view))]
        return sorted(sorted(range(len(view)), key=lambda c: mean[c])[:worst])
    return [c for c, v in enumerate(view)
            if v["teacher_below_baseline"] or any(d is not None and abs(100 * d) > points for d in v["delta"].values())]


def per_class_markdown(result: dict) -> str:
    """The per-class view as Markdown: a row per class (the teacher, the baseline, each run's Δ)."""
    _, what = class_key(result)
    view = result["per_class"]
    names = list(view[0]["delta"]) if view else []
    head = ["class", "teacher", "baseline", *(f"Δ {n}" for n in names), "teacher < baseline"]
    lines = [f"Per class ({what}, %; Δ in points against the baseline; teacher: "
             f"{result.get('teacher') or '— (give its run among the compared runs)'}):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in view:
        cells = [v["class"], _pct(v["teacher"]), _pct(v["baseline"])]
        cells += ["—" if v["delta"][n] is None else signed_pct(v["delta"][n]) for n in names]
        cells.append("—" if v["teacher_below_baseline"] is None else ("**yes**" if v["teacher_below_baseline"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_per_class_csv(path: Path, result: dict) -> None:
    view = result["per_class"]
    names = list(view[0]["delta"]) if view else []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "teacher", "baseline", *(f"delta_{n}" for n in names), "teacher_below_baseline"])
        for v in view:
            w.writerow([v["class"], v["teacher"], v["baseline"], *(v["delta"][n] for n in names),
                        v["teacher_below_baseline"]])


def signed_pct(x: float) -> str:
    """A difference in points, signed: ``+1.25``, ``-0.40``; one that rounds to zero is ``±0.00``
    (never ``-0.00``)."""
    text = f"{100 * x:+.2f}"
    return "±0.00" if text in ("+0.00", "-0.00") else text


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def split_sentence(result: dict) -> str:
    """Which images the table reports, and which checkpoints."""
    where = f"{result['dataset']} '{result['split']}' ({result['num_samples']} images)"
    if result.get("split_given"):
        return f"Reported on {where}, each run's best checkpoint on its validation split"
    return f"Validation: {where}, each run's best checkpoint"


def latency_sentence(result: dict) -> str:
    if not result.get("latency_device"):
        return "latency not measured"
    how = " with ONNX Runtime (the exported graphs)" if result.get("backend") == "onnxruntime" else ""
    return (f"latency: batch 1 on {result['latency_device']}{how}, one measurement per architecture and input size, "
            f"architectures interleaved in {result.get('latency_rounds')} rounds")


def markdown_table(result: dict) -> str:
    cls = result["class_names"]
    if result.get("task") == "classification":
        cols = [("top-1", "top1"), ("Δ top-1", "delta_top1"), ("top-5", "top5"), ("mAcc", "macc")]
        per_class = "acc" if len(cls) <= 30 else None
        note = " (mAcc: mean per-class accuracy; per-class columns: accuracy)"
    else:
        cols, per_class, note = [("mIoU", "miou"), ("Δ mIoU", "delta_miou"), ("mAcc", "macc"), ("aAcc", "aacc")], "iou", ""
    head = ["run", "method", "model", *(c for c, _ in cols), "#params", "ms/image", "FPS"] + (list(cls) if per_class else [])
    lines = [f"{split_sentence(result)}; percentages{note}; Δ against {result['baseline'] or '— (no baseline run)'}; "
             f"{latency_sentence(result)}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["name"], r["method"], r["model"]]
        for _, key in cols:
            if key.startswith("delta_"):
                cells.append("—" if r[key] is None else ("±0.00" if r["baseline"] else signed_pct(r[key])))
            else:
                cells.append(_pct(r[key]))
        cells += [f"{r['params'] / 1e6:.3f}M", "—" if r["ms_per_image"] is None else f"{r['ms_per_image']:.2f}",
                  "—" if r["fps"] is None else f"{r['fps']:.1f}"]
        cells += [_pct(x) for x in r[per_class]] if per_class else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, result: dict) -> None:
    if result.get("task") == "classification":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "method", "model", "top1", "delta_top1", "top5", "macc", "params", "ms_per_image",
                        "fps"] + [f"acc_{c}" for c in result["class_names"]])
            for r in result["rows"]:
                w.writerow([r["run"], r["method"], r["model"], r["top1"], r["delta_top1"], r["top5"], r["macc"],
                            r["params"], r["ms_per_image"], r["fps"]] + list(r["acc"]))
        return
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "model", "miou", "delta_miou", "macc", "aacc", "params", "ms_per_image", "fps"]
                   + [f"iou_{c}" for c in result["class_names"]])
        for r in result["rows"]:
            w.writerow([r["run"], r["method"], r["model"], r["miou"], r["delta_miou"], r["macc"], r["aacc"],
                        r["params"], r["ms_per_image"], r["fps"]] + list(r["iou"]))


@torch.no_grad()
def _example_figures(paths, labels, reports, weights, models, split, folder: OutputFolder, n: int,
                     device) -> list[str]:
    if n <= 0:
        return []
    per_image = [rep.get("per_image_iou", {}) for rep in reports]
    ids = [i for i in per_image[0] if all(i in p and not math.isnan(p[i]) for p in per_image)]
    if not ids:
        return []
    mean = {i: float(np.mean([p[i] for p in per_image])) for i in ids}
    ranked = sorted(ids, key=lambda i: -mean[i])
    n = min(n, max(1, len(ranked) // 2))
    picks = [("best", k, sid) for k, sid in enumerate(ranked[:n])] + \
            [("worst", k, sid) for k, sid in enumerate(ranked[::-1][:n])]
    _, ds, _ = eval_dataset(weights[0].config, split=split)
    pre = weights[0].preprocess
    pipe = SegPipeline(ds, pre)
    index = {sid: j for j, sid in enumerate(ds.ids)}
    written = []
    for kind, k, sid in picks:
        item = pipe[index[sid]]
        x = item["image"][None].to(device)
        preds = {}
        for model, label, p in zip(models, labels, paths):
            pred = model.predict(x, size=tuple(item["label"].shape))[0]
            preds[f"{p.name} ({label})"] = pred.cpu().numpy().astype(np.uint8)
        path = folder.file(f"examples/{kind}{k + 1:02d}_{sid}.png")
        figures.save_comparison_grid(path, pre.denormalize(item["image"]), item["label"].numpy().astype(np.uint8),
                                       preds, ds.palette, list(ds.class_names),
                                       title=f"{sid}: {kind} #{k + 1} by the runs' mean image IoU ({mean[sid]:.3f})")
        written.append(str(path))
    return written


@torch.no_grad()
def _class_examples(paths, reports, weights, models, split, folder: OutputFolder, n: int, device) -> list[str]:
    """Classification: the N images the runs are surest of (by the mean probability of the true
    class) and the N they are least sure of, each run's prediction under each image."""
    if n <= 0 or not models:
        return []
    probs = [rep.get("per_image_prob", {}) for rep in reports]
    ids = [i for i in probs[0] if all(i in p for p in probs)]
    if not ids:
        return []
    mean = {i: float(np.mean([p[i] for p in probs])) for i in ids}
    ranked = sorted(ids, key=lambda i: -mean[i])
    n = min(n, max(1, len(ranked) // 2))
    _, ds, _ = eval_dataset(weights[0].config, split=split)
    pipe = SegPipeline(ds, weights[0].preprocess)
    index = {sid: j for j, sid in enumerate(ds.ids)}
    names = list(ds.class_names)
    written = []
    for kind, picks in (("best", ranked[:n]), ("worst", ranked[::-1][:n])):
        images, captions = [], []
        for sid in picks:
            item = pipe[index[sid]]
            truth = int(item["label"].reshape(-1)[0])
            lines = [f"{sid}: {names[truth]}"]
            for model, p in zip(models, paths):
                prob = torch.softmax(model(item["image"][None].to(device)).logits.float().flatten(1)[0], 0)
                pred = int(prob.argmax())
                lines.append(f"{p.name}: {class_caption(names, truth, pred, float(prob[pred]))}")
            images.append(weights[0].preprocess.denormalize(item["image"]))
            captions.append(lines)
        path = folder.file(f"examples/{kind}.png")
        figures.save_class_examples(path, images, captions,
                                      title=f"{kind} {n} by the runs' mean probability of the true class")
        written.append(str(path))
    return written
