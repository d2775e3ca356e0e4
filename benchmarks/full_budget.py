"""Does distillation pay at a full training budget? Two students of one patient teacher, every
recipe chosen on val, then five seeds on test (issue 49 §4).

    python benchmarks/full_budget.py [--study segmentation|shapes|digits|digits-few]
                                     [--phase teacher,caches,grid,students]
                                     [--jobs N]

The study the issue asks for, on the built-in road scenes (400 training images, val 100, test
rendered at 1000):

* **The teacher** is patient (Beyer et al., CVPR 2022): `demo_teacher` trained for the students'
  own 160 epochs, not the 24 of the earlier benchmarks (whose teacher stood 6.4 points above
  `demo_student`). Kept beside the state (``full-budget-segmentation-cpu-teacher/``), as
  ``cached_vs_online.py`` keeps its own, so a later sitting reads the same weights.
* **Two pairs**: ``demo`` (`demo_student`, 0.039 M parameters, 43x smaller) and ``compact``
  (`compact_student`, 0.247 M, 6.8x smaller: the literature's size ratio).
* **The budget**: 160 epochs, batch 8, the library's student recipe (AdamW 2e-3, poly), the same
  for CE and every KD arm. CE's val curve is reported at each quarter (has it levelled off?).
* **The grid** (``grid``): every arm of :data:`GRID` on seed 0, scored on **val** only (best
  epoch), in the order listed, pair after pair; no test score is read. The CE baseline's grid
  is its augmentation (with and without cutmix), as much tuning as a method's. Forms: ``image``
  (the default cache: the teacher on the whole image, top-4 + tail, a crop takes its cells),
  ``schedule`` (the teacher on every crop the seed's student draws; equal to the live teacher
  to the bit, tested, so the online arm is not trained again), ``schedule cutmix`` (the same
  with ``--mix cutmix``: function matching) and ``schedule features`` (the plain schedule with the
  teacher's ``stage3`` features too, for CIRKD and Af-DCD), and ``image + pool`` (the default cache
  and one of 1600 unlabelled images, half of each batch, half the epochs: the same steps; the
  workflow ``kdcache demo`` shows). The CIRKD, Af-DCD and pool arms were added to the grid after its
  first 7 runs (read on val only), before any run of their own; DIST at weight 2 after 12, when
  weight 1 had beaten 0.25 in both pairs (the best at the edge of the weights tried).
* **Has CE levelled off?** After the grid, CE (its plain arm) trains once more on the grid seed for
  twice the epochs (``CE 2x epochs``: a diagnostic, val only, never a finalist); the report sets it
  beside CE at the study's budget. Added with the CIRKD, Af-DCD and pool arms. Once the grid was
  complete and CE had gained 2.3 points for twice the epochs in the ``demo`` pair, each pair's best
  KD arm was added for twice the epochs too (``<arm> 2x epochs``, its schedule twice as long; val
  only, never a finalist): does its lead over CE survive a budget at which CE still gains?
* **The choice** (fixed here, before any run): per pair, the CE arm of the best val score is the
  baseline; the KD arms are ranked by val and the best :data:`FINALISTS` go to the students phase,
  and, on the best of them, its teacher-aware row (``mask=teacher_correct``).
* **The library's defaults from the grid** (fixed on 2026-11-27 while ``compact | DIST w=2 schedule
  cutmix`` was still training, before its score was read): DIST's segmentation weight is the one of
  the best val, averaged over the two pairs, on the ``schedule cutmix`` form (the one form trained at
  every weight, 0.25, 1 and 2); the classification studies' defaults are chosen the same way, on
  ``digits`` (images no one here made) where it and ``shapes`` disagree.
* **The students** (``students``): the baseline and the finalists for seeds 0-4 (seed 0's grid
  run stands in), each scored on test once with its best-on-val checkpoint; paired differences
  against the baseline and between the finalists; the share of the teacher-student gap
  recovered.

**Classification** (``--study shapes`` or ``--study digits``; issue 49 asks for the built-in shapes
*and* a data set whose images the project did not generate): the same procedure with
`demo_cls_teacher` (patient: the students' 120 epochs) and `demo_cls_student`, the recipe of
``cached_vs_online.py``'s classification task (batch 32, lr 3e-3, random-resized crops of 0.5-1 of
the area), a top-5 cache, and :data:`CLS_GRID`, whose mixing is mixup (Beyer et al.'s function
matching for classifiers). ``digits`` is scikit-learn's copy of the UCI handwritten digits (1797
scans of 8 x 8, written here as a 32 x 32 ImageFolder, split 60/20/20 per class with a fixed
seed; ``pip install scikit-learn``): images no one here made.

``--study digits-few`` asks what ``digits`` cannot (its CE students stand within a point of the
teacher): the workflow of a user whose teacher knows more than the student's labels say. Digits'
own splits, but only a tenth of each class's training images keep their label (108); the other 969
are the ``unlabeled`` split, which the teacher labels (the ``image + pool`` form, as in the
segmentation grid). The teacher is ``digits``' own, trained on all 1077 labels (Hinton et al.'s
transfer set; Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised Learners",
NeurIPS 2020, distil a teacher through unlabelled images the same way). The students train for
1200 epochs of the 108 images (about digits' optimizer steps), validated every 10th, on
:data:`FEW_GRID`. It measures how much of what the teacher learnt from labels the student lacks
reaches it through the cache; CE sees only the 108 labels it has.

``--jobs N`` trains N runs at once in worker processes, one thread each (small students use two
threads poorly: on the 2-core machine two runs at once train 1.3-1.55x the images a second of one
on both threads); a slot with no run ready builds the next store a run reads, in its worker, so
no core idles while a store is built. Each record notes its threads.

The state (``benchmarks/results/full-budget-<study>-cpu.json``) keeps every finished run, so
a sitting cut short goes on where it stopped (a run cut short resumes from its ``last.pt``); the
results file is written from it after each run.
The settings below were fixed in a commit before the first run; the results file names it.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from cached_vs_online import (
    build_store,
    finished,
    keep_teacher,
    one_thread,
    paired,
    test_score,
    train_run,
)

from kdcache.core.outputs import file_sha256
from kdcache.core.runs import checkout_commit, device_name, resolve_device
from kdcache.methods import at_defaults
from kdcache.models import build_model, count_parameters
from kdcache.models.loading import open_weights
from kdcache.store import CacheStore
from kdcache.teacher.cache_build import CacheBuildConfig
from kdcache.train.student import config_from_store
from kdcache.train.trainer import TrainConfig, train

TEACHER = {"model": "demo_teacher", "dataset": "synthetic", "epochs": 160, "workers": 0}
PAIRS = {"demo": "demo_student", "compact": "compact_student"}
#: every arm's recipe (CE and KD alike), and what cached_vs_online's helpers read of a task
TASK = {"student": {"epochs": 160, "batch_size": 8, "workers": 0}, "test_size": 1000, "score": "miou"}
TOPK = 4
#: the synthetic data's options (the defaults: 400 training images of 96 x 128, val 100)
DATA_OPTIONS: dict = {}
CUTMIX = {"mix": "cutmix", "mix_alpha": 1.0, "mix_prob": 1.0}
SEEDS = (0, 1, 2, 3, 4)
GRID_SEED = 0
FINALISTS = 3

#: the teacher tap the feature methods read (``stage3``: 128 channels at stride 8 in the built-in teacher) and
#: the students' own ``stage3`` (72 and 64 channels): the build's ``--features`` and the methods' taps
FEATURES = {"features": ("stage3",)}
TAPS = {"student_tap": "stage3", "teacher_tap": "stage3"}
#: the grid, in the order it trains: arm -> (method spec, a list of them, or None for CE, form, mixed). The
#: methods' settings: kl and dist at the library's defaults (T = 1; weights 0.5 and 0.25, chosen on
#: val at this budget with the 24-epoch teacher) and at weight 1 (function matching lets the
#: teacher's term lead); cwd at its paper's segmentation settings (T = 4, weight 3); dist with logit
#: standardisation; bpkd at its paper's settings
GRID: dict[str, tuple[dict | list[dict] | None, str, bool]] = {
    "CE": (None, "image", False),
    "CE cutmix": (None, "image", True),
    "DIST schedule": ({"name": "dist", "weight": 0.25, "temperature": 1.0}, "schedule", False),
    "DIST schedule cutmix": ({"name": "dist", "weight": 0.25, "temperature": 1.0}, "schedule cutmix", True),
    "DIST w=1 schedule cutmix": ({"name": "dist", "weight": 1.0, "temperature": 1.0}, "schedule cutmix", True),
    "KL schedule": ({"name": "kl", "weight": 0.5, "temperature": 1.0}, "schedule", False),
    "KL w=1 schedule cutmix": ({"name": "kl", "weight": 1.0, "temperature": 1.0}, "schedule cutmix", True),
    "DIST image": ({"name": "dist", "weight": 0.25, "temperature": 1.0}, "image", False),
    "DIST w=1 schedule": ({"name": "dist", "weight": 1.0, "temperature": 1.0}, "schedule", False),
    "CWD schedule": ({"name": "cwd", "weight": 3.0, "temperature": 4.0}, "schedule", False),
    "DIST standardize schedule cutmix": ({"name": "dist", "weight": 1.0, "temperature": 1.0, "standardize": True},
                                         "schedule cutmix", True),
    "BPKD schedule": ({"name": "bpkd"}, "schedule", False),
    "CWD schedule cutmix": ({"name": "cwd", "weight": 3.0, "temperature": 4.0}, "schedule cutmix", True),
    # added on 2026-11-27, before their first run, once 7 of the grid's runs had been read (val only): the
    # feature methods at their papers' settings, each with the logit KD its authors train beside it (kl at the
    # library's default); from a schedule that also holds the teacher's stage3 features
    "CIRKD + KL schedule": ([{"name": "cirkd", **TAPS}, {"name": "kl", "weight": 0.5, "temperature": 1.0}],
                            "schedule features", False),
    "Af-DCD + KL schedule": ([{"name": "afdcd", **TAPS}, {"name": "kl", "weight": 0.5, "temperature": 1.0}],
                             "schedule features", False),
    # added at the same time: the workflow kdcache demo shows, a pool of unlabelled images the teacher labels
    "DIST + pool": ({"name": "dist", "weight": 0.25, "temperature": 1.0}, "image + pool", False),
    # added on 2026-11-27 before its first run, once 12 runs were in on val: DIST's weight grid had its best at
    # its edge (w = 1 over 0.25 on the cutmix schedule in both pairs), so one step past it
    "DIST w=2 schedule cutmix": ({"name": "dist", "weight": 2.0, "temperature": 1.0}, "schedule cutmix", True),
}
#: diagnostic arms, trained on the grid seed after the grid and never finalists: has CE levelled off at the
#: study's budget? CE (its plain arm) for twice the epochs, val only
DIAGNOSTIC: dict[str, tuple[dict | None, str, bool]] = {"CE 2x epochs": (None, "image", False)}
#: an arm named ``<arm> 2x epochs`` trains ``<arm>`` for twice the epochs (its schedule, too, twice as long).
#: Added on 2026-11-27 once the grid was complete and ``CE 2x epochs`` had shown that `demo_student`'s CE had
#: not levelled off at 160 epochs, before any run of its own: each pair's best KD arm on val for twice the
#: epochs too (a diagnostic, val only, never a finalist), set beside CE's (does the lead survive a budget at
#: which CE gains?)
TWICE = " 2x epochs"


def epochs_factor(arm: str) -> int:
    return 2 if arm.endswith(TWICE) else 1


#: the ``image + pool`` form: the default cache of the labelled images and one of :data:`POOL` images of the
#: synthetic ``unlabeled`` split (none of them a labelled image), each batch half of each (``POOL_SHARE``),
#: for half the epochs: the same optimizer steps and images a step as every other arm
POOL = 1600
POOL_SHARE = 0.5
#: each form's store in the working folder (a schedule's: one seed's crops)
STORES = {"image": "image.zarr", "schedule": "schedule-s{seed}.zarr", "schedule cutmix": "schedule-cutmix-s{seed}.zarr",
          "schedule mixup": "schedule-mixup-s{seed}.zarr", "schedule features": "schedule-features-s{seed}.zarr",
          "pool": "pool.zarr"}
TEACHER_AWARE = {"mask": "teacher_correct"}
LOGIT_METHODS = ("kl", "dist", "cwd")

# -- classification: shapes (built in) and digits (scans no one here made) -------------------------
CLS_TEACHER = {"model": "demo_cls_teacher", "epochs": 120, "batch_size": 32, "lr": 2e-3, "crop_area": (0.5, 1.0),
               "workers": 0}
CLS_PAIRS = {"cls": "demo_cls_student"}
CLS_STUDENT = {"epochs": 120, "batch_size": 32, "lr": 3e-3, "crop_area": (0.5, 1.0), "workers": 0}
MIXUP = {"mix": "mixup", "mix_alpha": 1.0, "mix_prob": 1.0}
#: kl and dist at the library's classification defaults (T = 4, weight 2), from each form; kl and dist as
#: function matching (T = 1, weight 1, mixup); logit standardisation; kl at weight 4
CLS_GRID: dict[str, tuple[dict | None, str, bool]] = {
    "CE": (None, "image", False),
    "CE mixup": (None, "image", True),
    "KL image": ({"name": "kl", "weight": 2.0, "temperature": 4.0}, "image", False),
    "KL schedule": ({"name": "kl", "weight": 2.0, "temperature": 4.0}, "schedule", False),
    "KL schedule mixup": ({"name": "kl", "weight": 2.0, "temperature": 4.0}, "schedule mixup", True),
    "KL T=1 w=1 schedule mixup": ({"name": "kl", "weight": 1.0, "temperature": 1.0}, "schedule mixup", True),
    "DIST schedule": ({"name": "dist", "weight": 2.0, "temperature": 4.0}, "schedule", False),
    "DIST schedule mixup": ({"name": "dist", "weight": 2.0, "temperature": 4.0}, "schedule mixup", True),
    "KL standardize schedule mixup": ({"name": "kl", "weight": 2.0, "temperature": 4.0, "standardize": True},
                                      "schedule mixup", True),
    # added on 2026-11-27, before the first classification run: dist from the default cache (the form a user
    # picks first), dist and kl as function matching at T = 1 (DIST's own temperature) and kl at T = 1 without
    # mixing (does the mixing or the temperature matter?), and kl one step past the edge of the weights that
    # kd-weight-classification-cpu.md tried (w = 2 was its largest and its best)
    "DIST image": ({"name": "dist", "weight": 2.0, "temperature": 4.0}, "image", False),
    "DIST T=1 w=1 schedule mixup": ({"name": "dist", "weight": 1.0, "temperature": 1.0}, "schedule mixup", True),
    "KL T=1 w=1 schedule": ({"name": "kl", "weight": 1.0, "temperature": 1.0}, "schedule", False),
    "KL w=4 schedule mixup": ({"name": "kl", "weight": 4.0, "temperature": 4.0}, "schedule mixup", True),
}
DIGITS_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
#: ``digits-few``: the share of each class's training images that keep their label (the rest are the
#: ``unlabeled`` split), and the students' recipe, whose epochs keep about digits' optimizer steps
#: (108 labelled images: 3 steps of 32 an epoch, 3600 in all; digits' 33 x 120 = 3960), validated every 10th
FEW_LABELLED = 0.1
FEW_STUDENT = {**CLS_STUDENT, "epochs": 1200, "eval_every": 10}
#: ``digits-few``'s grid (fixed on 2026-11-27 before its first run): CE with and without mixup; kl and dist at
#: the library's classification defaults (T = 4, weight 2) from the default cache and as function matching
#: from a mixup schedule; and the workflow this study asks about, the teacher's targets on the unlabelled
#: images (``image + pool``): kl and dist at the defaults, kl at T = 1 (plain KD), and the teacher's confident
#: hard labels (``pseudo`` at its defaults)
FEW_GRID: dict[str, tuple[dict | None, str, bool]] = {
    **{arm: CLS_GRID[arm] for arm in ("CE", "CE mixup", "KL image", "DIST image", "KL schedule mixup",
                                      "DIST T=1 w=1 schedule mixup")},
    "KL + pool": ({"name": "kl", "weight": 2.0, "temperature": 4.0}, "image + pool", False),
    "DIST + pool": ({"name": "dist", "weight": 2.0, "temperature": 4.0}, "image + pool", False),
    "KL T=1 w=1 + pool": ({"name": "kl", "weight": 1.0, "temperature": 1.0}, "image + pool", False),
    "Pseudo-labels + pool": ({"name": "pseudo"}, "image + pool", False),
}


#: issue 49's goal for each study: the best recipe from a cache on test over the seeds, paired against the
#: baseline: at least ``gain`` points, its paired 95% interval above ``lower``, and ``share`` of the
#: teacher–baseline gap recovered, in one pair (classification asks for the gain alone)
SEG_GOAL = {"gain": 1.5, "lower": 0.5, "share": 0.30}
CLS_GOAL = {"gain": 1.0}


def studies() -> dict[str, dict]:
    """Each study's settings (read at call time: the tests shrink them)."""
    seg = {"teacher": TEACHER, "pairs": PAIRS, "task": TASK, "topk": TOPK, "dataset": "synthetic",
           "data_options": DATA_OPTIONS, "grid": GRID, "diagnostic": DIAGNOSTIC, "mix": CUTMIX, "unit": "mIoU",
           "goal": SEG_GOAL}
    cls = {"teacher": CLS_TEACHER, "pairs": CLS_PAIRS, "topk": 5, "grid": CLS_GRID, "diagnostic": DIAGNOSTIC,
           "mix": MIXUP, "unit": "top-1", "goal": CLS_GOAL}
    return {"segmentation": seg,
            "shapes": {**cls, "dataset": "shapes", "data_name": "the built-in shapes", "data_options": {"size": 1000},
                       "task": {"student": CLS_STUDENT, "test_size": 10000, "score": "top1"}},
            "digits": {**cls, "dataset": "imagefolder", "data_name": "scikit-learn's UCI digits (an ImageFolder)",
                       "data_options": {}, "prepare": write_digits,
                       "task": {"student": CLS_STUDENT, "test_size": None, "score": "top1"}},
            "digits-few": {**cls, "dataset": "imagefolder", "grid": FEW_GRID, "data_options": {},
                           "data_name": f"scikit-learn's UCI digits with {FEW_LABELLED:.0%} of the training labels, "
                                        "the rest unlabelled (the teacher of `digits`, trained on all of them)",
                           "prepare": lambda root: write_digits(root, FEW_LABELLED), "teacher_from": "digits",
                           "task": {"student": FEW_STUDENT, "test_size": None, "score": "top1"}}}


def write_digits(root: Path, labelled: float = 1.0) -> Path:
    """scikit-learn's UCI handwritten digits as a 32 x 32 RGB ImageFolder under ``root``
    (:func:`write_digit_images`)."""
    if (root / "test").is_dir():
        return root
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: --study digits reads scikit-learn's copy of the digits: pip install scikit-learn") from None
    digits = load_digits()
    return write_digit_images(digits.images, digits.target, root, labelled)


def write_digit_images(images, targets, root: Path, labelled: float = 1.0) -> Path:
    """8 x 8 digit scans (values 0-16) as a 32 x 32 RGB ImageFolder under ``root``: train/val/test
    per :data:`DIGITS_SPLITS`, class by class, a fixed permutation. With ``labelled`` < 1, only the
    first ``labelled`` of each class's training images (at least one) keep their class folder; the
    others go to the ``unlabeled`` split, named by their index alone (val and test are the same)."""
    import numpy as np
    from PIL import Image

    part = root.with_name(root.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        cuts = np.cumsum([round(f * len(idx)) for f in DIGITS_SPLITS.values()])[:-1]
        for split, chosen in zip(DIGITS_SPLITS, np.split(idx, cuts)):
            keep = max(1, round(labelled * len(chosen))) if split == "train" else len(chosen)
            for n, i in enumerate(chosen):
                folder = part / split / str(c) if n < keep else part / "unlabeled"
                folder.mkdir(parents=True, exist_ok=True)
                gray = (images[i] * (255 / 16)).round().astype(np.uint8)
                image = Image.fromarray(gray).resize((32, 32), Image.BILINEAR).convert("RGB")
                image.save(folder / f"{i:04d}.png")
    part.replace(root)
    return root


def arm_key(pair: str, arm: str, seed: int) -> str:
    return f"{pair} | {arm} | seed {seed}"


def run_folder(out: Path, pair: str, arm: str, seed: int) -> Path:
    return out / f"{pair}-{arm.lower().replace('=', '').replace(' ', '-')}-s{seed}"


def finalists(state: dict, pair: str, grid: dict | None = None) -> tuple[str | None, list[str]]:
    """The pair's baseline (the CE arm of the best val) and its finalists (the best KD arms by
    val, then the best one's teacher-aware row), once every arm of ``grid`` (the study's) is in."""
    grid = GRID if grid is None else grid
    runs = state.get("runs", {})
    vals = {arm: runs[arm_key(pair, arm, GRID_SEED)]["val"] for arm in grid if arm_key(pair, arm, GRID_SEED) in runs}
    if len(vals) < len(grid):
        return None, []
    ce = max((a for a in grid if grid[a][0] is None), key=vals.get)
    kd = sorted((a for a in grid if grid[a][0] is not None), key=lambda a: -vals[a])[:FINALISTS]
    return ce, [*kd, f"{kd[0]} + teacher-aware"]


def mixing_pairs(grid: dict) -> list[tuple[str, str]]:
    """(arm, the same arm with mixing) of ``grid``: the same method spec, the form without and
    with the mixing (``image`` both for CE, where the mixing is the student's alone)."""
    out = []
    for mixed, (method, form, with_mix) in grid.items():
        if not with_mix:
            continue
        plain_form = form.removesuffix(" cutmix").removesuffix(" mixup")
        out += [(plain, mixed) for plain, (m, f, w) in grid.items() if not w and m == method and f == plain_form]
    return out


def standing(state: dict, study: dict) -> dict[str, dict[str, dict]]:
    """Each method (or combination) at the library's current defaults for the study's task (a mixed
    arm's: those of a student with the study's ``--mix``) against
    the pair's best CE arm, on the grid seed's val: label (``kl``, ``cirkd+kl``) -> pair -> its arm
    (of several forms at the defaults, the best on val), ``val``, the CE arm and its ``ce``. A pair
    enters once its CE arms and every arm of the label are in."""
    task = "segmentation" if study["task"]["score"] == "miou" else "classification"
    grid, runs = study["grid"], state.get("runs", {})
    out: dict[str, dict[str, dict]] = {}
    for pair in study["pairs"]:
        val = {arm: runs[arm_key(pair, arm, GRID_SEED)]["val"] for arm in grid if arm_key(pair, arm, GRID_SEED) in runs}
        ces = [a for a in grid if grid[a][0] is None]
        if not all(a in val for a in ces):
            continue
        ce = max(ces, key=val.get)
        labels: dict[str, list[str]] = {}
        for arm, (method, _form, mixed) in grid.items():
            specs = methods_of(method)
            mix = study["mix"]["mix"] if mixed else None  # a mixing student's defaults are its own
            if method is not None and all(at_defaults(m, task, mix) for m in specs):
                labels.setdefault("+".join(m["name"] for m in specs), []).append(arm)
        for label, arms in labels.items():
            if all(a in val for a in arms):
                best = max(arms, key=val.get)
                out.setdefault(label, {})[pair] = {"arm": best, "val": val[best], "ce_arm": ce, "ce": val[ce]}
    return out


def recipe(arm: str, grid: dict | None = None) -> tuple[dict | None, str, bool]:
    """An arm's (method, form, mixed): a grid arm's, or a finalist's teacher-aware row."""
    grid = GRID if grid is None else grid
    if arm.endswith(TWICE) and arm not in grid:  # a grid arm for twice the epochs
        return recipe(arm[:-len(TWICE)], grid)
    if arm.endswith(" + teacher-aware"):  # on its logit method(s): a feature method has no teacher-aware option
        method, form, mixed = grid[arm[:-len(" + teacher-aware")]]
        return [{**m, **TEACHER_AWARE} if m["name"] in LOGIT_METHODS else m for m in methods_of(method)], form, mixed
    return grid[arm]


def methods_of(method: dict | list[dict] | None) -> list[dict]:
    """An arm's method spec(s) as ``train-student``'s list (CE: ``none``)."""
    return [{"name": "none"}] if method is None else list(method) if isinstance(method, list) else [method]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", choices=("segmentation", "shapes", "digits", "digits-few"), default="segmentation")
    ap.add_argument("--phase", default="teacher,caches,grid,students")
    ap.add_argument("--pairs", default=None, help="the study's pairs to train (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, each on one thread (default 1: one "
                    "run on every thread)")
    ap.add_argument("--out", default=None, help="working folder (default runs/full-budget[-<study>])")
    ap.add_argument("--state", default=None, help="the state file (default "
                    "benchmarks/results/full-budget-<study>-cpu.json); the results file is written beside it")
    args = ap.parse_args()
    study = studies()[args.study]
    seg = args.study == "segmentation"
    teacher_recipe, task, grid = study["teacher"], study["task"], study["grid"]
    arms = {**grid, **study["diagnostic"]}  # what a run may be
    phases = set(args.phase.split(","))
    pairs = args.pairs.split(",") if args.pairs else list(study["pairs"])
    out = Path(args.out or ("runs/full-budget" if seg else f"runs/full-budget-{args.study}"))
    out.mkdir(parents=True, exist_ok=True)
    state_path = Path(args.state or Path(__file__).parent / "results" / f"full-budget-{args.study}-cpu.json")
    results = state_path.with_suffix(".md")
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if phases == {"report"}:
        write_report(state, results, study)
        return
    root = study["prepare"](out / "data") if "prepare" in study else None
    data = {"dataset": study["dataset"], "data_root": str(root) if root else None,
            "dataset_options": dict(study["data_options"])}
    device = resolve_device("auto")
    state["machine"] = device_name(device)
    head = checkout_commit(Path(__file__).parent)
    state.setdefault("commits", [])
    if head and head not in state["commits"]:
        state["commits"].append(head)
    kept = state_path.with_name(state_path.stem + "-teacher")
    if "teacher_from" in study:  # another study's teacher (trained by that study's teacher phase)
        kept = state_path.with_name(f"full-budget-{study['teacher_from']}-cpu-teacher")
        if not (kept / "best.pt").exists():
            raise SystemExit(f"error: --study {args.study} distils the teacher of --study {study['teacher_from']}, "
                             f"and {kept} has none: run that study's teacher phase first")

    def save() -> None:
        tmp = state_path.with_name(state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)
        write_report(state, results, study)

    if "teacher" in phases and not (kept / "best.pt").exists():
        work = out / "teacher"
        t0 = time.perf_counter()
        train(TrainConfig(out=str(work), **data, **{k: v for k, v in teacher_recipe.items() if k != "dataset"}),
              overwrite=True, show_progress=False)
        keep_teacher(work, kept)
        state["teacher_seconds"] = time.perf_counter() - t0
        state["teacher_machine"] = device_name(device)
        save()
    if not (kept / "best.pt").exists():
        raise SystemExit(f"error: no teacher at {kept}: run the teacher phase first")
    fingerprint = open_weights(str(kept)).weights_sha256()
    if state.get("teacher", {}).get("weights_sha256", fingerprint) != fingerprint:
        raise SystemExit(f"error: the teacher in {kept} is not the one {state_path} was measured with")
    if "teacher" not in state:
        log = [json.loads(line) for line in (kept / "metrics.jsonl").read_text().splitlines()]
        key = "val_top1" if task["score"] == "top1" else "val_miou"
        state["teacher"] = {**test_score(task, kept), "weights_sha256": fingerprint,
                            "val_curve": [r.get(key, r.get("val_miou")) for r in log if "val_miou" in r]}
        classes = open_weights(str(kept)).config.get("num_classes", 11)
        state["params"] = {name: count_parameters(build_model(model, classes)) for name, model
                           in {"teacher": teacher_recipe["model"], **study["pairs"]}.items()}
        save()

    @functools.cache
    def teacher_sha() -> str:
        return file_sha256(kept / "best.pt")

    def store_path(form: str, seed: int, factor: int = 1) -> tuple[str, int, Path]:
        """(form, factor, path) of the store of ``form`` (``image + pool``: the labelled images' store)."""
        if form == "image + pool":  # the labelled images' store (the pool's is store("pool", 0))
            form = "image"
        factor = factor if form.startswith("schedule") else 1
        path = out / STORES[form].format(seed=seed)
        if factor > 1:
            path = path.with_name(f"{path.stem}-{factor}x{path.suffix}")
        return form, factor, path

    def store_ready(form: str, seed: int, factor: int = 1) -> bool:
        """Whether the store of ``form`` is built and complete for this teacher (nothing is built)."""
        path = store_path(form, seed, factor)[2]
        if not (path / "zarr.json").exists():
            return False
        s = CacheStore(str(path))
        return s.schema.teacher.get("weights_sha256") == teacher_sha() and bool(s.done().all())

    def store_job(form: str, seed: int, factor: int = 1) -> tuple[str, Path, CacheBuildConfig | None]:
        """(its name in the table, path, what builds it) of the store of ``form`` (a schedule's: of
        ``seed``'s crops for ``factor`` times the epochs); None for a store built and complete."""
        form, factor, path = store_path(form, seed, factor)
        if (path / "zarr.json").exists():
            s = CacheStore(str(path))
            if s.schema.teacher.get("weights_sha256") != teacher_sha():
                shutil.rmtree(path)  # another teacher's store (an earlier working folder)
            elif s.done().all():
                return form, path, None
        if form == "pool":
            extra = {"split": "unlabeled", "limit": POOL}
        elif form == "image":
            extra = {}
        else:  # a schedule draws the crops (and mixing) the students' options draw
            aug = {k: task["student"][k] for k in ("crop", "scale", "crop_area", "hflip") if k in task["student"]}
            extra = {"schedule_epochs": task["student"]["epochs"] * factor, "schedules": 1, "first_schedule": seed, **aug,
                     **(study["mix"] if form.endswith(("cutmix", "mixup")) else {}),
                     **(FEATURES if form.endswith("features") else {})}
        name = f"{form} seed {seed}" + (f" ({factor}x epochs)" if factor > 1 else "") if "schedule_epochs" in extra else form
        return name, path, CacheBuildConfig(weights=str(kept), out=str(path), **{"split": "train", **data, **extra},
                                            topk=study["topk"], workers=0)

    def record_store(name: str, built: dict) -> None:
        state.setdefault("caches", {})[name] = built
        save()

    def store(form: str, seed: int, factor: int = 1) -> Path:
        """The store of ``form``, built here first if it is not complete."""
        name, path, cfg = store_job(form, seed, factor)
        if cfg is not None:
            record_store(name, {**build_store(cfg), "jobs": 1})
        return path

    def plan(pair: str, arm: str, seed: int):
        """An arm's student configuration (its stores built first)."""
        method, form, mixed = recipe(arm, arms)
        cache = store(form, seed, epochs_factor(arm))
        student = {**task["student"], "epochs": task["student"]["epochs"] * epochs_factor(arm)}
        if form == "image + pool":  # half of each batch from the pool, for half the epochs: the same steps
            if "eval_every" in student:  # and validated after as many steps
                student["eval_every"] = max(1, round(student["eval_every"] * (1 - POOL_SHARE)))
            student.update(epochs=max(1, round(student["epochs"] * (1 - POOL_SHARE))),
                           unlabeled_caches=[str(store("pool", 0))], unlabeled_share=POOL_SHARE)
        return config_from_store(str(cache), out=str(run_folder(out, pair, arm, seed)), seed=seed,
                                 model=study["pairs"][pair], methods=methods_of(method), **student,
                                 **(study["mix"] if mixed else {}))

    def record(key: str, r: dict) -> None:
        state.setdefault("runs", {})[key] = r
        save()

    def record_again(key: str, r: dict) -> None:
        """A grid run trained again for its test score (its folder was lost): the grid's record keeps
        its val (the finalists were chosen on it); the score, and the new run's record beside it."""
        again = dict(r)
        state["runs"][key].update(score=again.pop("score"), num_samples=again.pop("num_samples"),
                                  trained_again=again)
        save()

    def execute(todo: list[tuple[str, str, int, bool]], again: frozenset[str] = frozenset()) -> None:
        """Train the runs (pair, arm, seed, scored on test) not in the state yet, and those keyed in
        ``again`` (grid runs trained again for their test scores, :func:`record_again`): one at a time on
        every thread, or ``--jobs`` at once, one thread each (the stores built between them)."""
        todo = [t for t in todo if arm_key(*t[:3]) in again or arm_key(*t[:3]) not in state.get("runs", {})]

        def keep(key: str, r: dict) -> None:
            (record_again if key in again else record)(key, r)

        if args.jobs == 1:
            for pair, arm, seed, scored in todo:
                keep(arm_key(pair, arm, seed),
                     train_run(plan(pair, arm, seed), run_folder(out, pair, arm, seed), task, scored))
            return
        building: dict[Path, str] = {}  # the stores being built in a worker (never opened meanwhile)

        def missing(t: tuple[str, str, int, bool]) -> list[tuple[str, int, int]]:
            """The stores run ``t`` reads that are not built yet (or are being built)."""
            form, factor = recipe(t[1], arms)[1], epochs_factor(t[1])
            need = [(form, t[2], factor)] + ([("pool", 0, 1)] if form == "image + pool" else [])
            return [n for n in need if store_path(*n)[2] in building or not store_ready(*n)]

        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=one_thread) as pool:
            running: dict = {}  # job: ("run", key) or ("store", name, path)
            while todo or running:
                while todo and len(running) < args.jobs:
                    # a run whose stores are built goes first; when none is, a free slot builds the first
                    # store a waiting run reads (in a worker, one thread, as a run trains), so no core idles
                    # while a store is built. The order changes no result: each run is fixed by its arm
                    # and seed, each store by its form and seed
                    ready = [t for t in todo if not missing(t)]
                    if ready:
                        pair, arm, seed, scored = t = ready[0]
                        todo.remove(t)
                        job = pool.submit(train_run, plan(pair, arm, seed), run_folder(out, pair, arm, seed), task,
                                          scored)
                        running[job] = ("run", arm_key(pair, arm, seed))
                        continue
                    wanted = [n for t in todo for n in missing(t) if store_path(*n)[2] not in building]
                    if not wanted:
                        break  # every store a waiting run reads is being built
                    name, path, cfg = store_job(*wanted[0])
                    building[path] = name
                    running[pool.submit(build_store, cfg)] = ("store", name, path)
                if not running:  # cannot happen: a waiting run's store is ready, being built, or to build
                    raise RuntimeError(f"no run of {todo} can start and no store is being built")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for job in done:
                    what = running.pop(job)
                    if what[0] == "store":
                        del building[what[2]]
                        record_store(what[1], {**job.result(), "jobs": args.jobs})  # beside the runs
                    else:
                        keep(what[1], job.result())

    if "caches" in phases:
        store("image", 0)
    if "grid" in phases:
        execute([(pair, arm, GRID_SEED, False) for arm in arms for pair in pairs])
        execute([(pair, finalists(state, pair, grid)[1][0] + TWICE, GRID_SEED, False) for pair in pairs
                 if finalists(state, pair, grid)[0] is not None])
    if "students" in phases:
        todo, lost = [], []
        for pair in pairs:
            ce, kd = finalists(state, pair, grid)
            if ce is None:
                raise SystemExit(f"error: the grid of pair {pair} is not complete: run the grid phase first")
            for seed in SEEDS:
                for arm in (ce, *kd):
                    r = state.get("runs", {}).get(arm_key(pair, arm, seed))
                    if r is not None and "score" not in r:  # a grid run: scored on test once, best-on-val checkpoint
                        folder = run_folder(out, pair, arm, seed)
                        if not finished({"student": {"epochs": epochs(r)}}, folder):
                            lost.append((pair, arm, seed, True))  # went with an earlier working folder
                            continue
                        r.update(test_score(task, folder))
                        save()
                    todo.append((pair, arm, seed, True))
        execute(lost + todo, again=frozenset(arm_key(*t[:3]) for t in lost))
    save()


def write_report(state: dict, path: Path, study: dict | None = None) -> None:
    study = study or studies()["segmentation"]
    teacher, task, pairs, grid, unit = study["teacher"], study["task"], study["pairs"], study["grid"], study["unit"]
    runs = state.get("runs", {})
    test = f"{task['test_size']} test images" if task["test_size"] else "the test split"
    title = ("two students of a patient teacher" if len(pairs) > 1
             else f"`{next(iter(pairs.values()))}` and a patient teacher on {study.get('data_name', study['dataset'])}")
    lines = [f"# Distillation at a full budget: {title}", "",
             f"Machine: {state.get('machine', '?')}. Written by `benchmarks/full_budget.py` at commit(s) "
             f"{', '.join(state.get('commits', []))} (settings fixed before the first run). Teacher `{teacher['model']}`, "
             f"{teacher['epochs']} epochs; students {task['student']['epochs']} epochs, batch "
             f"{task['student']['batch_size']}, every arm with the same data, steps and crops. Grid on seed {GRID_SEED}, "
             f"val only; the finalists on seeds {', '.join(map(str, SEEDS))}, checkpoints on val, scores on "
             f"{test} ({unit} %).", ""]
    for note in state.get("notes", []):
        lines += [note, ""]
    t = state.get("teacher")
    if t:
        curve = t["val_curve"]
        lines += [f"Teacher on test: {100 * t['score']:.2f}; its val curve at each quarter: "
                  + ", ".join(f"epoch {i + 1}: {100 * curve[i]:.2f}" for i in quarters(len(curve))) + ".", ""]
    if "params" in state:
        lines += ["Parameters: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in state["params"].items()) + ".", ""]
    if "caches" in state:
        lines += ["| cache | build seconds | bytes per training image |", "|---|---|---|"]
        lines += [f"| {k} | {c['seconds']:.0f} | {c['disk_bytes_per_image']:,.0f} |" for k, c in state["caches"].items()]
        lines.append("")
    stand = standing(state, study)
    if stand:
        lines += [f"## Each method at the library's defaults against CE (seed {GRID_SEED}, val {unit})", "",
                  "The methods' settings a student given only the method's name takes (a mixed form's: those of a student "
                  "given the method's name and the mixing), at the commit that wrote this file; of several forms "
                  "at those settings, the best on val; against the pair's best CE arm. "
                  "`kdcache list-methods` says which of them are below CE here.", "",
                  "| method | pair | arm | val | best CE arm | CE val | Δ |", "|---|---|---|---|---|---|---|"]
        for label, by_pair in stand.items():
            for pair, s in by_pair.items():
                lines.append(f"| {label} | {pair} | {s['arm']} | {100 * s['val']:.2f} | {s['ce_arm']} | "
                             f"{100 * s['ce']:.2f} | {100 * (s['val'] - s['ce']):+.2f} |")
        lines.append("")
    mixes = [(pair, plain, mixed) for pair in pairs for plain, mixed in mixing_pairs(grid)
             if arm_key(pair, plain, GRID_SEED) in runs and arm_key(pair, mixed, GRID_SEED) in runs]
    if mixes:
        lines += [f"## Does mixing pay here? (seed {GRID_SEED}, val {unit})", "",
                  f"Each recipe of the grid trained with and without {study['mix']['mix']} (a schedule's with it holds "
                  "the teacher on the mixed crops: function matching), the rest the same.", "",
                  f"| recipe | pair | without | with {study['mix']['mix']} | Δ |", "|---|---|---|---|---|"]
        for pair, plain, mixed in mixes:
            a, b = (runs[arm_key(pair, arm, GRID_SEED)]["val"] for arm in (plain, mixed))
            lines.append(f"| {plain} | {pair} | {100 * a:.2f} | {100 * b:.2f} | {100 * (b - a):+.2f} |")
        lines.append("")
    for pair in pairs:
        got = {arm: runs.get(arm_key(pair, arm, GRID_SEED)) for arm in grid}
        if not any(got.values()):
            continue
        lines += [f"## Pair {pair}: `{pairs[pair]}`, the grid (seed {GRID_SEED}, val {unit}, best epoch)", "",
                  "| arm | method | form | val | val at each quarter | train images/s |", "|---|---|---|---|---|---|"]
        for arm, r in got.items():
            if r is None:
                continue
            method, form, mixed = grid[arm]
            spec = "none" if method is None else " + ".join(
                ",".join(f"{k}={v}" for k, v in m.items() if k not in TAPS) for m in methods_of(method))
            curve = r["val_curve"]
            mix = f" ({study['mix']['mix']})" if mixed and form == "image" else ""
            lines.append(f"| {arm} | {spec} | {form}{mix} | {100 * r['val']:.2f} | "
                         + ", ".join(f"{100 * curve[i]:.1f}" for i in quarters(len(curve)))
                         + f" | {r['images_per_s']:.0f}{' (1 thread)' if r.get('threads') == 1 else ''} |")
        lines.append("")
        for arm, base in (("CE 2x epochs", "CE"),):
            long, short = runs.get(arm_key(pair, arm, GRID_SEED)), got.get(base)
            if long and short:
                lines += [_levelled(short, long, unit), ""]
        ce, kd = finalists(state, pair, grid)
        twice = runs.get(arm_key(pair, kd[0] + TWICE, GRID_SEED)) if kd else None
        ce_twice = runs.get(arm_key(pair, "CE 2x epochs", GRID_SEED))
        if twice and ce_twice:
            lines += [f"Does the best KD recipe keep its lead for twice the epochs? {kd[0]}: {100 * got[kd[0]]['val']:.2f} "
                      f"val {unit} for {epochs(got[kd[0]])} epochs, {100 * twice['val']:.2f} for "
                      f"{epochs(twice)} (a diagnostic run, never a finalist): "
                      f"{100 * (twice['val'] - ce_twice['val']):+.2f} against CE (its plain arm) for as many, where "
                      f"its lead over the same CE arm at {epochs(got[kd[0]])} epochs was "
                      f"{100 * (got[kd[0]]['val'] - got['CE']['val']):+.2f}.", ""]
        if ce is None:
            lines += [f"{sum(r is not None for r in got.values())} of {len(grid)} grid arms trained; the finalists "
                      "are chosen once all are in.", ""]
            continue
        lines += [f"Chosen on val: baseline {ce}; finalists {', '.join(kd)}.", ""]
        scored = {arm: {sd: runs[arm_key(pair, arm, sd)] for sd in SEEDS
                        if "score" in runs.get(arm_key(pair, arm, sd), {})} for arm in (ce, *kd)}
        if not any(scored.values()):
            continue
        lines += [f"### Pair {pair} on test", "", "| arm | seeds | test | per seed |", "|---|---|---|---|"]
        for arm, r in scored.items():
            xs = [100 * v["score"] for v in r.values()]
            if xs:
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                lines.append(f"| {arm} | {len(xs)} | {statistics.mean(xs):.2f} ± {sd:.2f} | "
                             + ", ".join(f"{x:.2f}" for x in xs) + " |")
        lines += ["", "| comparison | seeds | mean | 95% interval | share of the teacher–CE gap |", "|---|---|---|---|---|"]
        base = scored[ce]
        gap = 100 * t["score"] - statistics.mean(100 * v["score"] for v in base.values()) if base else float("nan")
        for i, a in enumerate(kd):
            for b in (ce, *kd[:i]):
                common = sorted(set(scored[a]) & set(scored[b]))
                if not common:
                    continue
                p = paired([100 * (scored[a][sd]["score"] - scored[b][sd]["score"]) for sd in common])
                ci = f"[{p['lo']:+.2f}, {p['hi']:+.2f}]" if p["n"] > 1 else ""
                share = f"{100 * p['mean'] / gap:.1f}%" if b == ce and gap > 0 else ""
                lines.append(f"| {a} − {b} | {p['n']} | {p['mean']:+.2f} | {ci} | {share} |")
        lines.append("")
        lines += _against_goal(study.get("goal"), scored, ce, kd, gap, unit)
        again = [(arm, sd, r) for arm, by_seed in scored.items() for sd, r in by_seed.items() if "trained_again" in r]
        if again:
            lines += ["Trained again for their test scores (the grid run's folder, with its checkpoints, was lost with "
                      "an earlier working folder; the grid's val, on which the finalists were chosen, stands): "
                      + "; ".join(f"{arm}, seed {sd}: val {100 * r['val']:.2f} in the grid, "
                                  f"{100 * r['trained_again']['val']:.2f} trained again" for arm, sd, r in again)
                      + ".", ""]
    path.write_text("\n".join(lines) + "\n")


def _against_goal(goal: dict | None, scored: dict, ce: str, kd: list[str], gap: float, unit: str) -> list[str]:
    """Each finalist against the study's goal (:data:`SEG_GOAL`), paired against the baseline over
    the seeds both have: which condition it meets. The first finalist is the one chosen on val; a
    finalist met the goal only with every seed of :data:`SEEDS` in."""
    if not goal:
        return []
    conds = [f"at least {goal['gain']:+.1f} points"]
    if "lower" in goal:
        conds.append(f"its paired 95% interval above {goal['lower']:+.1f}")
    if "share" in goal:
        conds.append(f"at least {goal['share']:.0%} of the teacher–baseline gap")
    head = ["finalist", "seeds", f"Δ {unit}"] + (["interval from"] if "lower" in goal else []) + (
        ["share of the gap"] if "share" in goal else []) + ["goal met"]
    lines = [f"Against the goal ({', '.join(conds)}; {len(SEEDS)} seeds; the first finalist is the one "
             "chosen on val):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in kd:
        common = sorted(set(scored[arm]) & set(scored[ce]))
        if len(common) < 2:
            continue
        p = paired([100 * (scored[arm][sd]["score"] - scored[ce][sd]["score"]) for sd in common])
        missed = [f"{p['mean']:+.3f} < {goal['gain']:+.1f}"] if p["mean"] < goal["gain"] else []
        row = [arm, str(p["n"]), f"{p['mean']:+.2f}"]
        if "lower" in goal:
            row.append(f"{p['lo']:+.2f}")
            missed += [f"interval from {p['lo']:+.2f}"] if p["lo"] <= goal["lower"] else []
        if "share" in goal:
            share = p["mean"] / gap if gap > 0 else float("nan")
            row.append(f"{100 * share:.1f}%")
            missed += [f"{100 * share:.1f}% of the gap"] if not share >= goal["share"] else []
        missed += [f"{p['n']} of {len(SEEDS)} seeds"] if p["n"] < len(SEEDS) else []
        row.append("yes" if not missed else "no: " + ", ".join(missed))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _levelled(short: dict, long: dict, unit: str) -> str:
    """Has CE levelled off? Its arm against the same run for twice the epochs (val, best epoch, and
    the mean of the last tenth of each run's epochs, less noisy than one epoch's)."""
    def tail(r):
        curve = r["val_curve"]
        return 100 * statistics.mean(curve[-max(1, len(curve) // 10):])
    return (f"Has CE levelled off? CE for {epochs(short)} epochs: {100 * short['val']:.2f} val {unit} (the "
            f"mean of its last tenth of validations {tail(short):.2f}); for {epochs(long)} epochs (a diagnostic "
            f"run, never a finalist): {100 * long['val']:.2f} ({tail(long):.2f}), "
            f"{100 * (long['val'] - short['val']):+.2f} for twice the budget.")


def epochs(r: dict) -> int:
    """The epochs a run trained (a record from before ``epochs`` was kept validated every one)."""
    return r.get("epochs", len(r["val_curve"]))


def quarters(n: int) -> list[int]:
    return sorted({max(0, round(n * q) - 1) for q in (0.25, 0.5, 0.75, 1.0)})


if __name__ == "__main__":
    main()
