"""Which recipe should ``kdcache demo`` show first? Candidates chosen on val over three seeds, then
the choice against the CE baseline on test (issue 49 §5).

    python benchmarks/demo_recipe.py [--phase val,test] [--threads N]

The demo's own setting (``kdcache/demo/segmentation.py``): 100 labelled synthetic images, a pool of
400 unlabelled ones, `demo_teacher` at width 48 trained on the labelled images, `demo_student`
for 40 epochs of batch 8, validation every 4th epoch (the checkpoint chosen among those). Each
seed trains its own teacher, as the demo does. The candidates, fixed here before any run:

* **Teachers**: the demo's 40 epochs, and a patient one of 80 (Beyer et al., CVPR 2022: a good
  teacher is patient); the demo has time for either (it took about 3.5 of its 10 minutes).
* **The CE baseline's grid**: CE, and CE with cutmix (as much tuning as a method's form).
* **KD**: DIST at weight 1 (the weight the full-budget grid chose over 0.25 in both of its pairs,
  ``full-budget-segmentation-cpu.md``, val only) from each form a user would pick: the default
  cache (``image``), a schedule (the teacher on every crop the student draws), a schedule with
  cutmix (function matching), and the default cache with the unlabelled pool (half of each
  batch, half the epochs: the same steps).

**The choice** (``val``): the CE arm and the (teacher, KD arm) of the best mean val mIoU over the
seeds. **The test** (``test``): those two runs of every seed, each on the demo's own test split
(100 images: what ``kdcache demo``'s table shows) and on 1000 test images; paired differences.
Every test number read is in the results file. The state
(``benchmarks/results/demo-recipe-cpu.json``) keeps every finished run: a sitting cut short goes
on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from cached_vs_online import paired, run_record, test_score

from kdcache.core.runs import checkout_commit, device_name, resolve_device
from kdcache.demo.segmentation import DemoStudent, run_demo

SEEDS = (0, 1, 2)
TEACHER_EPOCHS = {"teacher 40 epochs": 40, "teacher 80 epochs": 80}
STUDENT_EPOCHS = 40
DIST_W1 = [{"name": "dist", "weight": 1.0}]
CE_ARMS = {"CE": DemoStudent([{"name": "none"}]), "CE cutmix": DemoStudent([{"name": "none"}], mix=True)}
KD_ARMS = {"DIST w=1 image": DemoStudent(DIST_W1), "DIST w=1 schedule": DemoStudent(DIST_W1, "schedule"),
           "DIST w=1 schedule cutmix": DemoStudent(DIST_W1, "schedule", mix=True),
           "DIST w=1 + pool": DemoStudent(DIST_W1, "pool")}
TEST = {"demo test (100 images)": None, "test (1000 images)": 1000}

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / "benchmarks" / "results" / "demo-recipe-cpu.json"


def folder_name(name: str) -> str:
    return name.lower().replace("=", "").replace("+ ", "").replace(" ", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", default="val,test")
    ap.add_argument("--out", default="runs/demo-recipe")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("auto")
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    state.setdefault("runs", {})
    commits = state.setdefault("commits", [])
    if checkout_commit() not in commits:
        commits.append(checkout_commit())
    state["machine"] = device_name(device)

    def save():
        STATE.write_text(json.dumps(state, indent=1))
        write_report(state, STATE.with_suffix(".md"))

    out = Path(args.out)
    phases = args.phase.split(",")

    def folder(teacher: str, seed: int) -> Path:
        return out / f"{folder_name(teacher)}-seed{seed}"

    if "val" in phases:
        for seed in SEEDS:
            for teacher, epochs in TEACHER_EPOCHS.items():
                lineup = {**(CE_ARMS if teacher == next(iter(TEACHER_EPOCHS)) else {}), **KD_ARMS}
                for arm, student in lineup.items():
                    key = f"{arm} | {teacher} | seed {seed}" if arm in KD_ARMS else f"{arm} | seed {seed}"
                    if key in state["runs"]:
                        continue
                    t0 = time.perf_counter()
                    run_demo(folder(teacher, seed), teacher_epochs=epochs, student_epochs=STUDENT_EPOCHS,
                             students={folder_name(arm): student}, seed=seed, device=str(device), compare=False,
                             show_progress=False)
                    run = folder(teacher, seed) / f"student-{folder_name(arm)}"
                    rec = run_record({"score": "miou"}, run)
                    state["runs"][key] = {"val": rec["val"], "val_curve": rec["val_curve"], "run": str(run),
                                          "seconds": time.perf_counter() - t0}
                    print(f"{key}: val {100 * rec['val']:.2f}", flush=True)
                    save()
    choice = choose(state)
    if choice and "test" in phases:
        state["choice"] = choice
        for seed in SEEDS:
            for key in (f"{choice['ce']} | seed {seed}", f"{choice['kd']} | seed {seed}"):
                rec = state["runs"][key]
                for name, size in TEST.items():
                    if name not in rec.setdefault("test", {}):
                        rec["test"][name] = test_score({"test_size": size, "score": "miou"}, Path(rec["run"]))["score"]
                        save()
    save()


def val_means(state: dict) -> dict[str, float]:
    """Each arm's mean val mIoU over the seeds, once every seed has it."""
    by_arm: dict[str, list[float]] = {}
    for key, rec in state["runs"].items():
        by_arm.setdefault(key.rsplit(" | seed ", 1)[0], []).append(rec["val"])
    return {arm: statistics.mean(v) for arm, v in by_arm.items() if len(v) == len(SEEDS)}


def choose(state: dict) -> dict | None:
    """The CE arm and the KD arm (with its teacher) of the best mean val; None until all have run."""
    means = val_means(state)
    kd = [f"{a} | {t}" for a in KD_ARMS for t in TEACHER_EPOCHS]
    if not all(a in means for a in [*CE_ARMS, *kd]):
        return None
    return {"ce": max(CE_ARMS, key=means.get), "kd": max(kd, key=means.get)}


def write_report(state: dict, path: Path) -> None:
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    means = val_means(state)
    lines = ["# The demo's recipe: candidates on val, the choice on test", "",
             f"Machine: {state.get('machine')}. Written by `benchmarks/demo_recipe.py` at commit(s) "
             f"{', '.join(state.get('commits', []))} (the candidates fixed before the first run). The demo's setting: "
             f"100 labelled synthetic images, a pool of 400 unlabelled ones, `demo_teacher` (width 48) on the "
             f"labelled images, `demo_student` for {STUDENT_EPOCHS} epochs of batch 8, val every 4th epoch; seeds "
             f"{', '.join(map(str, SEEDS))}, each with its own teacher.", "",
             "## Val mIoU (best checked epoch), every candidate", "",
             "| arm | teacher | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean |",
             "|---|---|" + "---|" * (len(SEEDS) + 1)]
    rows = [(a, None) for a in CE_ARMS] + [(a, t) for t in TEACHER_EPOCHS for a in KD_ARMS]
    for arm, teacher in rows:
        name = f"{arm} | {teacher}" if teacher else arm
        vals = [state["runs"].get(f"{name} | seed {s}", {}).get("val") for s in SEEDS]
        lines.append(f"| {arm} | {teacher or '—'} | " + " | ".join(pct(v) if v is not None else "—" for v in vals)
                     + f" | {pct(means[name]) if name in means else '—'} |")
    choice = state.get("choice")
    if choice is None:
        lines += ["", "The choice is made once every candidate has run on every seed."]
    else:
        lines += ["", f"**Chosen on val**: the baseline `{choice['ce']}` and `{choice['kd']}`.", "",
                  "## The choice on test (mIoU %)", "",
                  "| split | " + " | ".join(f"seed {s}: baseline, chosen, Δ" for s in SEEDS)
                  + " | mean Δ [95% interval] |", "|---|" + "---|" * (len(SEEDS) + 1)]
        for name in TEST:
            cells, deltas = [], []
            for s in SEEDS:
                b = state["runs"][f"{choice['ce']} | seed {s}"].get("test", {}).get(name)
                k = state["runs"][f"{choice['kd']} | seed {s}"].get("test", {}).get(name)
                if b is None or k is None:
                    cells.append("—")
                    continue
                deltas.append(100 * (k - b))
                cells.append(f"{pct(b)}, {pct(k)}, {deltas[-1]:+.2f}")
            p = paired(deltas) if len(deltas) == len(SEEDS) else None
            lines.append(f"| {name} | " + " | ".join(cells) + " | "
                         + (f"{p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]" if p else "—") + " |")
    timed = state.get("demo_runs", [])
    if timed:
        lines += ["", "## `kdcache demo` timed", "",
                  "| commit | machine | wall | recommended student | its Δ mIoU over CE (test, 100 images) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['commit']} | {d['machine']} | {d['seconds'] // 60:.0f} min {d['seconds'] % 60:.0f} s | "
                  f"{d['recommended']} | {100 * d['delta']:+.2f} |" for d in timed]
    secs = [r["seconds"] for r in state["runs"].values()]
    if secs:
        lines += ["", f"Seconds per candidate run, its teacher and caches included where it built them first: "
                      f"median {statistics.median(secs):.0f} (other CPU-heavy work shared the cores: not a "
                      f"measurement of the demo's time)."]
    lines += ["", *[f"- {n}" for n in state.get("notes", [])]] if state.get("notes") else []
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
