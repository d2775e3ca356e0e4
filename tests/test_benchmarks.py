"""The benchmark scripts that other tooling runs unattended (benchmarks/gpu_check.sh runs
kd_step_time.py on a GPU machine) still run, on a tiny cache, and write their tables."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.store import CacheStore
from kdcache.teacher.cache_build import CacheBuildConfig, build_teacher_cache

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    runpy.run_path(str(BENCH / name), run_name="__main__")


def test_kd_step_time_runs_every_variant_on_the_same_batches(small_store, tmp_path, monkeypatch):
    """The batches come from the pipeline that reads the cached logits: the CE-only trainer's
    (`--method none`) reads no cache, and batches from it once broke the KL variants."""
    teacher, store = small_store
    run_script("kd_step_time.py", "--cache", store, "--teacher", teacher, "--limit", 16, "--batch-size", 2,
               "--steps", 2, "--rounds", 1, "--device", "cpu", "--results", tmp_path, "--profile", 3,
               monkeypatch=monkeypatch)
    table = (tmp_path / "kd-step-time-cpu.md").read_text()
    for row in ("| CE only |", "| KL, cache |", "| KL, online teacher |"):
        assert row in table
    assert "cached-KD step / CE-only step = **" in table
    # --profile: the functions a KD step adds, the KD term's own among them (a CE step never calls them)
    added = table.split("## Host time a KD step adds (cProfile, 3 steps of each)")[1]
    rows = [r for r in added.splitlines() if r.startswith("| `")]
    assert len(rows) == 25
    kd_own = [r for r in rows if "api.py" in r and "(topk_kl)" in r]
    assert kd_own and kd_own[0].rstrip(" |").endswith("| 1")  # one call more a step


def test_epoch_time_interleave_pairs_each_epoch_with_a_ce_epoch(small_store, tmp_path, monkeypatch, capsys):
    """``--interleave R``: one epoch of each variant in turn, R rounds after a warm-up; each
    variant's ratio is the median over rounds of its epoch / that round's CE epoch (recomputed here
    from the seconds it printed), not a ratio of medians."""
    import re
    import statistics

    _, store = small_store
    run_script("epoch_time.py", "--cache", store, "--limit", 16, "--interleave", 3, "--results", tmp_path,
               monkeypatch=monkeypatch)
    printed = capsys.readouterr().out
    rounds = re.findall(r"^round (\d+): (.*)$", printed, flags=re.M)
    assert [int(r) for r, _ in rounds] == [0, 1, 2]
    secs = [dict((v, float(t)) for v, t in re.findall(r"((?:CE only, again|CE only|none, stream|kl, stream|kl, random)) "
                                                      r"([0-9.]+) s", line)) for _, line in rounds]
    assert all(len(r) == 5 for r in secs)  # with a second CE-only trainer: the pairing's own spread
    table = (tmp_path / "epoch-time-interleaved-cpu.md").read_text()
    assert "--interleave 3" in table
    row = {cells[0]: cells for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| "))}
    assert row["CE only"][2] == "1.000" and row["CE only"][4] == "1.000–1.000"
    for v in ("none, stream", "kl, stream", "kl, random", "CE only, again"):
        want = statistics.median(r[v] / r["CE only"] for r in secs)
        assert float(row[v][2]) == pytest.approx(want, rel=0.02, abs=0.002), v  # the printed seconds are rounded
    assert f"measured **{row['kl, stream'][2]}**" in table
    assert f"a second CE-only trainer, the same run built again: {row['CE only, again'][2]}." in table


def test_loss_host_overhead_writes_every_path(tmp_path, monkeypatch):
    """The CPU mode: every row. It replaces the kernel launches and the kl method's loss for the process;
    setting them here first makes monkeypatch put the real ones back afterwards."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU mode runs under TRITON_INTERPRET=1 (set by conftest.py where there is no GPU)")
    from kdcache.kernels import triton_kl
    from kdcache.methods import kl as kl_module

    for name in ("_map_fwd", "_map_bwd"):
        monkeypatch.setattr(triton_kl, name, getattr(triton_kl, name))
    monkeypatch.setattr(kl_module, "topk_kl", kl_module.topk_kl)
    run_script("loss_host_overhead.py", "--calls", 2, "--rounds", 1, "--results", tmp_path, monkeypatch=monkeypatch)
    table = (tmp_path / "loss-host-overhead-cpu.md").read_text()
    for row in ("| topk_kl, eager (autograd function) |", "| topk_kl, custom operators |", "| the kl method, eager |"):
        assert row in table
    assert "launches mocked" in table and "custom operators / eager = **" in table


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_loss_host_overheads_launches_alone_compute_the_loss(monkeypatch):
    """The GPU mode's extra row launches the two kernels itself, on buffers made once: they must be the
    loss and gradient that topk_kl gives (here under Triton's interpreter, a tiny map), or the row would
    time a wrong launch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs under TRITON_INTERPRET=1 (set by conftest.py where there is no GPU)")
    import torch

    from kdcache.core.topk import topk_targets
    from kdcache.kernels import topk_kl

    monkeypatch.syspath_prepend(str(BENCH))
    script = runpy.run_path(str(BENCH / "loss_host_overhead.py"), run_name="lho")
    torch.manual_seed(0)
    s = torch.randn(2, 19, 3, 5)
    v, i, tail = topk_targets(torch.randn(2, 19, 3, 5) * 3, 4)
    v, i, tail = v.half(), i.to(torch.uint8), tail.half()
    ign = torch.rand(2, 3, 5) < 0.3
    run, out, grad = script["launches_alone"](s, v, i, tail, ign)
    run()
    x = s.double().requires_grad_(True)
    ref = topk_kl(x, v.double(), i, tail.double(), ignore_mask=ign, weight=0.5, backend="torch")
    (g_ref,) = torch.autograd.grad(ref, x)
    assert abs(out.item() - ref.item()) <= 1e-4 * abs(ref.item())
    assert torch.allclose(grad.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_a_run_is_resumed_only_with_exactly_its_options(tmp_path, monkeypatch):
    """cached_vs_online.resumable_run: a folder with a last.pt whose config.json has every option of
    the configuration (tuples written as lists), and no other; no last.pt, nothing to resume."""
    monkeypatch.syspath_prepend(str(BENCH))
    script = runpy.run_path(str(BENCH / "cached_vs_online.py"), run_name="cvo")

    class Cfg:
        def __init__(self, **kw):
            self.kw = kw

        def to_dict(self):
            return dict(self.kw)

    (tmp_path / "config.json").write_text('{"seed": 0, "crop": [96, 128], "cache_targets": "schedule"}')
    resumable = script["resumable_run"]
    assert not resumable(Cfg(seed=0, crop=(96, 128)), tmp_path)  # no last.pt
    (tmp_path / "last.pt").write_bytes(b"")
    assert resumable(Cfg(seed=0, crop=(96, 128)), tmp_path)
    assert not resumable(Cfg(seed=1, crop=(96, 128)), tmp_path)
    assert not resumable(Cfg(seed=0, crop=(96, 128), mix="cutmix"), tmp_path)  # an option the run lacks


def test_kernels_before_after_reports_each_rounds_ratio(monkeypatch):
    """kernels_before_after.py's table: per case the median over rounds of each side's time, and the
    median over rounds of each round's own before/after ratio with its range (not the ratio of the
    medians), for the fused kernel and the eager control."""
    monkeypatch.syspath_prepend(str(BENCH))  # it lays sides out with checkout_site
    script = runpy.run_path(str(BENCH / "kernels_before_after.py"), run_name="kba")

    def side(fused, eager):
        return {"dtype": "float32", "cases": [{"kind": "rows", "shape": [8, 1000], "k": 4,
                                               "ms": {"fused": fused, "eager": eager}}]}

    rounds = [{"before": side(4.0, 2.0), "after": side(1.0, 2.0)},  # fused 4.0x, eager 1.0x
              {"before": side(3.0, 2.2), "after": side(1.5, 2.0)},  # 2.0x, 1.1x
              {"before": side(6.0, 1.8), "after": side(5.0, 2.0)}]  # 1.2x, 0.9x
    table = script["report"](rounds, "abc1234", "def5678")
    row = next(line for line in table.splitlines() if line.startswith("| rows 8×1000"))
    # fused: medians 4.00 and 1.50 ms, speed-up the median ratio 2.00x, not 4.00 / 1.50 = 2.67x
    assert row == "| rows 8×1000 | 4 | 4.00 | 1.50 | 2.00× (1.20–4.00) | 1.00× (0.90–1.10) |"
    assert "before (abc1234) and after (def5678)" in table


def test_numba_vectorised_sees_calls_through_a_register():
    """numba_vectorised.py's call finder: Numba calls libm as ``movabsq $exp, %r12; callq *%r12``,
    which a regex for ``call … exp`` does not see; the finder resolves the register. Checked on
    made-up machine code and on a small Numba function that calls math.exp and math.log."""
    import math

    import numpy as np
    from numba import njit

    script = runpy.run_path(str(BENCH / "numba_vectorised.py"))
    calls, math_calls = script["calls"], script["math_calls"]
    asm = ["\tmovabsq\t$exp, %r12", "\tcallq\t*%r12", "\tcallq\t*%r12", "\tmovabsq\t$.LCPI0_3, %rax",
           "\tvmovq\t%xmm0, %rax", "\tcallq\t*%rax", "\tcallq\tlog@PLT"]
    assert calls(asm) == {"exp": 2, "indirect (unresolved)": 1, "log": 1}
    old_regex = [x for x in asm if __import__("re").search(r"call\w*\s+\*?\S*(exp|log)f?\b", x)]
    assert old_regex == ["\tcallq\tlog@PLT"]  # what the report counted before: the register calls were missed

    @njit(cache=False, error_model="numpy")
    def f(x):
        s = 0.0
        for i in range(x.shape[0]):
            s += math.exp(x[i])
        return math.log(s)

    f(np.ones(4))
    found = math_calls(calls("\n".join(f.inspect_asm().values()).splitlines()))
    assert found["exp"] >= 1 and found["log"] >= 1, found


def _t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """Student's t CDF by Simpson's rule on its density (an independent check of a t table)."""
    import math

    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    h = x / steps
    s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


#: per task: tiny data options (training and val), the test split's size, the student's batch
TINY = {"classification": ({"size": 48}, 40, 16), "segmentation": ({"size": 8, "resolution": [32, 48]}, 6, 4)}


@pytest.mark.parametrize("task_name", sorted(TINY))
@pytest.mark.slow  # trains every arm of the benchmark, each seed
def test_cached_vs_online_pairs_seeds_and_reports_every_arm(task_name, tmp_path, monkeypatch):
    """cached_vs_online.py on a tiny setting of each task: every arm trains for every seed (the
    online arm over the schedule store; segmentation's bilinear arm with --target-resample
    bilinear), the report holds each arm, the chosen temperature and the paired differences with
    their 95% t interval; its t table matches the t distribution."""
    script = runpy.run_path(str(BENCH / "cached_vs_online.py"), run_name="cvo")
    for df, q in script["T975"].items():
        assert abs(_t_cdf(q, df) - 0.975) < 2e-4, df
    p = script["paired"]([1.0, 2.0, 3.0, 4.0, 5.0])
    assert p["mean"] == 3.0 and abs(p["hi"] - p["lo"] - 2 * 2.776 * (2.5 ** 0.5) / 5 ** 0.5) < 1e-9
    options, test_size, batch = TINY[task_name]
    task = script["TASKS"][task_name]
    monkeypatch.setitem(task, "teacher", {**task["teacher"], "epochs": 1, "dataset_options": options})
    monkeypatch.setitem(task, "data_options", options)
    monkeypatch.setitem(task, "test_size", test_size)
    monkeypatch.setitem(task, "student", {**task["student"], "epochs": 2, "batch_size": batch})
    module = script["main"].__globals__  # run_path returns a copy of the script's globals
    monkeypatch.setitem(module, "TEMPERATURES", (1.0, 4.0))
    monkeypatch.setitem(module, "TUNE_SEEDS", (0,))
    monkeypatch.setitem(module, "WEIGHTS", (0.5, 1.0))
    results = tmp_path / "results"
    monkeypatch.setitem(module, "__file__", str(results / "x" / "cached_vs_online.py"))  # results go to x/results
    (results / "x" / "results").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--seeds", "0,1",
                                      "--out", str(tmp_path / "work")])
    script["main"]()
    state_file = results / "x" / "results" / f"cached-vs-online-{task_name}-cpu.json"  # beside the results file
    state = __import__("json").loads(state_file.read_text())
    assert len(state["teacher"]["weights_sha256"]) == 64
    assert set(state["students"]) == set(script["arm_names"](task_name))
    assert all(set(r) == {"0", "1"} for r in state["students"].values())
    # one schedule store per seed, holding that seed's crops alone
    for sd in (0, 1):
        c = state["caches"][f"schedule seed {sd}"]
        assert c["epochs"] == 2 and c["schedules"] == 1
        assert list(CacheStore(str(tmp_path / "work" / f"schedule-s{sd}.zarr")).schema.schedules_held) == [sd]
    assert all(r["num_samples"] == test_size for arm in state["students"].values() for r in arm.values())
    assert all(r["machine"].startswith("cpu: ") for arm in state["students"].values() for r in arm.values())
    table_path = results / "x" / "results" / f"cached-vs-online-{task_name}-cpu.md"
    table = table_path.read_text()
    for row in ("| CE |", "| KL schedule |", "| DIST online |", "| KL schedule − KL online | 2 |",
                "| DIST whole image − CE | 2 |"):
        assert row in table
    # the teacher's weights are kept beside the state, byte for byte
    kept = results / "x" / "results" / f"cached-vs-online-{task_name}-cpu-teacher"
    assert (kept / "best.pt").read_bytes() == (tmp_path / "work" / "teacher" / "best.pt").read_bytes()
    if task_name == "segmentation":  # the temperature is fixed in advance: no tune runs
        assert state["temperature"] == task["temperature"] and "tune" not in state and "Temperature" not in table
        assert all((tmp_path / "work" / f"s{sd}-{m}-schedule").exists() for sd in (0, 1) for m in ("kl", "dist"))
    else:  # seed 0's schedule arms are its tune runs at the chosen T (the same run); seed 1 trains its own
        assert "## Temperature, chosen on val" in table
        for m in ("kl", "dist"):
            T = state["temperature"][m]
            assert not (tmp_path / "work" / f"s0-{m}-schedule").exists()
            assert (tmp_path / "work" / f"s1-{m}-schedule").exists()
            assert state["students"][f"{m.upper()} schedule"]["0"]["val"] == state["tune"][f"{m} T={T:g} seed 0"]
    # the weights phase: w = 1 and CE read from the students phase (the same store, seed and options),
    # w = 0.5 trained from the seed's schedule with that weight; val only, the chosen weight the best
    assert state["weights"]["kl w=1 seed 0"] == {"val": state["students"]["KL schedule"]["0"]["val"],
                                                 "from": "students: KL schedule",
                                                 "machine": state["students"]["KL schedule"]["0"]["machine"]}
    assert state["weights"]["CE seed 0"]["val"] == state["students"]["CE"]["0"]["val"]
    assert not any("score" in r for r in state["weights"].values())
    for m in ("kl", "dist"):
        cfg = __import__("json").loads((tmp_path / "work" / f"weights-{m}-w0.5-s0" / "config.json").read_text())
        assert [(x["name"], x["weight"], x["temperature"]) for x in cfg["methods"]] == [(m, 0.5, state["temperature"][m])]
        vals = {w: state["weights"][f"{m} w={w:g} seed 0"]["val"] for w in (0.5, 1.0)}
        assert state["weight"][m] == max(vals, key=lambda w: (vals[w], w == 1.0))
    assert "## KD weight, chosen on val" in table and "| kl | " in table
    assert script["choose_weight"]({0.25: 0.5, 0.5: 0.6, 1.0: 0.6, 2.0: 0.4}) == 1.0  # a tie keeps the nearest 1
    assert script["choose_weight"]({0.25: 0.7, 0.5: 0.6, 1.0: 0.6, 2.0: 0.4}) == 0.25
    if task_name == "segmentation":
        assert "| DIST whole image, bilinear − DIST online | 2 |" in table
        row = next(r for r in table.splitlines() if r.startswith("| KL whole image, bilinear − KL whole image | 2 |"))
        runs = state["students"]
        d = [100 * (runs["KL whole image, bilinear"][sd]["score"] - runs["KL whole image"][sd]["score"]) for sd in "01"]
        assert row.endswith(" | " + ", ".join(f"{x:+.2f}" for x in d) + " |"), row
        cfg = __import__("json").loads((tmp_path / "work" / "s1-kl-whole-image-bilinear" / "config.json").read_text())
        assert cfg["target_resample"] == "bilinear" and cfg["cache_targets"] == "logits"
    # a rerun of the caches phase builds only what is missing: nothing here
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--seeds", "0,1", "--phase", "caches",
                                      "--out", str(tmp_path / "work")])
    script["main"]()
    again = __import__("json").loads(state_file.read_text())
    assert again["caches"] == state["caches"]
    # a later sitting that lost the working folder: the kept teacher is read (no teacher is trained),
    # and every run is in the state, so no schedule store is built again
    import shutil
    shutil.rmtree(tmp_path / "work")
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--seeds", "0,1",
                                      "--out", str(tmp_path / "work")])
    script["main"]()
    assert not (tmp_path / "work" / "teacher").exists()
    assert not any((tmp_path / "work").glob("schedule-s*.zarr")) and (tmp_path / "work" / "image.zarr").exists()
    assert __import__("json").loads(state_file.read_text())["students"] == state["students"]
    # a store another teacher built (an earlier run's folder) is built again, not read
    import torch

    ckpt = torch.load(kept / "best.pt", weights_only=False)  # the same network, other weights
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1
    foreign = tmp_path / "other.pt"
    torch.save(ckpt, foreign)
    shutil.rmtree(tmp_path / "work" / "image.zarr")
    build_teacher_cache(CacheBuildConfig(weights=str(foreign), out=str(tmp_path / "work" / "image.zarr"),
                                         dataset=task["teacher"]["dataset"], dataset_options=options, topk=task["topk"],
                                         limit=2, workers=0), show_progress=False)
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--seeds", "0,1", "--phase", "caches",
                                      "--out", str(tmp_path / "work")])
    script["main"]()
    rebuilt = CacheStore(str(tmp_path / "work" / "image.zarr"))
    assert rebuilt.schema.teacher["weights"].endswith(f"cached-vs-online-{task_name}-cpu-teacher/best.pt")
    assert rebuilt.done().all() and len(rebuilt.done()) > 2
    # a teacher other than the one the state was measured with is refused, and the state kept
    again["teacher"]["weights_sha256"] = "0" * 64
    state_file.write_text(__import__("json").dumps(again))
    with pytest.raises(SystemExit, match="error: the teacher in .* is not the one .* was measured with"):
        script["main"]()
    again["teacher"]["weights_sha256"] = state["teacher"]["weights_sha256"]
    state_file.write_text(__import__("json").dumps(again))
    assert __import__("json").loads(state_file.read_text())["students"] == state["students"]
    # several processes share one state: a run another process holds is left to it, and runs
    # another process saved meanwhile are kept when this one saves
    state_file.write_text(__import__("json").dumps({**state, "students": {
        arm: {sd: r for sd, r in runs.items() if (arm, sd) != ("CE", "1")} for arm, runs in state["students"].items()}}))
    other = script["claim"](tmp_path / "work" / "claims", "CE seed 1")  # as another process would hold it
    assert other is not None and script["claim"](tmp_path / "work" / "claims", "CE seed 1") is None
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--seeds", "0,1", "--phase", "students",
                                      "--out", str(tmp_path / "work")])
    script["main"]()
    assert not (tmp_path / "work" / "s1-ce").exists()
    assert "1" not in __import__("json").loads(state_file.read_text())["students"]["CE"]
    other.close()  # its process ended: the run is free, and the next process trains it
    script["main"]()
    assert (tmp_path / "work" / "s1-ce" / "best.pt").exists()
    assert __import__("json").loads(state_file.read_text())["students"]["CE"]["1"]["num_samples"] == test_size
    # a state of its own (--state): its results file and its kept teacher beside it, the main ones untouched
    before = table_path.read_text()
    own = results / "own" / "kd-weight.json"
    own.parent.mkdir()
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--phase", "caches", "--state", str(own),
                                      "--teacher", str(kept), "--out", str(tmp_path / "work")])
    script["main"]()
    assert "Teacher on test" in (results / "own" / "kd-weight.md").read_text()
    assert (results / "own" / "kd-weight-teacher" / "best.pt").read_bytes() == (kept / "best.pt").read_bytes()
    assert table_path.read_text() == before
    # --phase report: the results file written again from the state alone, nothing trained or recorded
    table_path.write_text("stale")
    untouched = state_file.read_text()
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--phase", "report",
                                      "--out", str(tmp_path / "nowhere")])
    script["main"]()
    assert table_path.read_text() == before and state_file.read_text() == untouched
    assert not (tmp_path / "nowhere" / "teacher").exists()
    monkeypatch.setattr(sys, "argv", ["cached_vs_online.py", "--task", task_name, "--phase", "report",
                                      "--state", str(results / "own" / "none.json"), "--out", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="error: no state at .*none.json to report"):
        script["main"]()


def test_cached_vs_online_merges_the_runs_of_processes_that_share_a_state():
    """Each process adds its own runs; a save keeps the other's (tune values, student seeds per
    arm, notes and commits in order, once each), and this process's own keys win."""
    merge = runpy.run_path(str(BENCH / "cached_vs_online.py"), run_name="cvo")["merge_state"]
    theirs = {"machine": "a", "commits": ["c1"], "tune": {"kl T=1 seed 0": 0.5},
              "students": {"CE": {"0": {"score": 0.4}}, "KL online": {"1": {"score": 0.3}}}, "notes": ["n1"],
              "caches": {"whole image": {"seconds": 5}, "schedule seed 1": {"seconds": 9}}}
    ours = {"machine": "b", "commits": ["c1", "c2"], "tune": {"kl T=2 seed 0": 0.6}, "temperature": {"kl": 2.0},
            "students": {"CE": {"1": {"score": 0.45}}}, "notes": ["n1", "n2"],
            "caches": {"whole image": {"seconds": 5}, "schedule seed 0": {"seconds": 8}}}
    m = merge(ours, theirs)
    assert m["machine"] == "b" and m["temperature"] == {"kl": 2.0} and m["commits"] == ["c1", "c2"]
    assert m["tune"] == {"kl T=1 seed 0": 0.5, "kl T=2 seed 0": 0.6} and m["notes"] == ["n1", "n2"]
    assert m["students"] == {"CE": {"0": {"score": 0.4}, "1": {"score": 0.45}}, "KL online": {"1": {"score": 0.3}}}
    assert set(m["caches"]) == {"whole image", "schedule seed 0", "schedule seed 1"}  # each process's stores
    assert "tune" not in merge({"commits": []}, {"commits": []})  # nothing invented


def test_weak_teacher_targets_by_hand():
    """The targets table of weak_teacher.py against a hand computation on a made-up state: the paired
    difference of the variant chosen on val, what plain KD loses on building against CE and what the
    variant wins back (in IoU points), the standard teacher's difference, and which targets are met;
    the weak-class target is judged only where plain KD's loss is measured (its 95% interval above 0)."""
    script = runpy.run_path(str(BENCH / "weak_teacher.py"), run_name="weak")

    def run(miou, building, val):
        iou = [0.5] * 11
        iou[1] = building  # building is class 1 of the road scenes
        return {"miou": miou, "iou": iou, "val": val}

    runs = {"CE": {"0": run(0.50, 0.70, 0), "1": run(0.52, 0.72, 0)},
            "weak teacher, KL plain": {"0": run(0.51, 0.60, 0), "1": run(0.53, 0.62, 0)},
            "weak teacher, KL mask": {"0": run(0.525, 0.66, 0.6), "1": run(0.545, 0.67, 0.6)},
            "weak teacher, DIST plain": {"0": run(0.52, 0.70, 0)},
            "weak teacher, DIST class weights": {"0": run(0.515, 0.71, 0.5)},
            "weak teacher, DIST mask": {"0": run(0.53, 0.69, 0.4)},
            "standard teacher, KL plain": {"0": run(0.56, 0.8, 0), "1": run(0.57, 0.8, 0)},
            "standard teacher, KL mask": {"0": run(0.557, 0.8, 0)}}
    rows = {r["method"]: r for r in script["targets"](runs, {"kl": "mask", "dist": "class weights"})}
    kl, dist = rows["kl"], rows["dist"]
    assert kl["n"] == 2 and kl["weak"] == pytest.approx(1.5)  # (1.5 + 1.5) / 2
    assert kl["lost"] == pytest.approx(10.0) and kl["won"] == pytest.approx(5.5)  # (6 + 5) / 2 of (10 + 10) / 2
    assert kl["standard"] == pytest.approx(-0.3) and kl["standard_n"] == 1
    assert kl["met"] == ["+1.0 mIoU", "half the weak class"] and kl["best"] and not dist["best"]
    assert dist["weak"] == pytest.approx(-0.5) and dist["lost"] == pytest.approx(0.0) and dist["met"] == []
    assert dist["standard"] is None
    assert kl["lost_measured"] and kl["lost_lo"] == pytest.approx(10.0)  # the same loss in both seeds: sd 0
    assert not dist["lost_measured"]  # one seed has no interval
    # plain KD loses 4 and 1 points on building: mean 2.5, sd 2.1213, t(1) 12.706 → [-16.56, +21.56]
    noisy = dict(runs, **{"weak teacher, KL plain": {"0": run(0.51, 0.66, 0), "1": run(0.53, 0.71, 0)},
                          "weak teacher, KL mask": {"0": run(0.525, 0.68, 0.6), "1": run(0.545, 0.72, 0.6)}})
    kl = {r["method"]: r for r in script["targets"](noisy, {"kl": "mask"})}["kl"]
    assert kl["lost"] == pytest.approx(2.5) and kl["won"] == pytest.approx(1.5)  # (2 + 1) / 2: more than half
    assert kl["lost_lo"] == pytest.approx(2.5 - 12.706 * 1.5) and kl["lost_hi"] == pytest.approx(2.5 + 12.706 * 1.5)
    assert not kl["lost_measured"] and "half the weak class" not in kl["met"]


@pytest.mark.slow  # trains every arm of the benchmark
def test_weak_teacher_runs_every_arm_and_reports_the_weak_class(tmp_path, monkeypatch):
    """weak_teacher.py on a tiny setting: the weak teacher's training labels lose building to sky in
    the chosen images only, its val labels none; every arm trains for each seed; the class-weight
    arms read the same seed's CE run (trained again when its folder is gone); the state beside the
    results file; a teacher cut short is trained again, one whose weights changed is refused; the
    report holds each arm with its seeds, the paired differences per seed, the class weights and the
    per-class table."""
    import json as _json

    import numpy as np

    script = runpy.run_path(str(BENCH / "weak_teacher.py"), run_name="weak")
    module = script["main"].__globals__
    opts = {"size": 6, "resolution": [32, 48]}
    monkeypatch.setitem(module, "DATA_OPTIONS", opts)
    monkeypatch.setitem(module, "TEST_SIZE", 4)
    monkeypatch.setitem(module, "TEACHER", {**script["TEACHER"], "epochs": 1, "batch_size": 4})
    monkeypatch.setitem(module, "STUDENT", {**script["STUDENT"], "epochs": 1, "batch_size": 4})
    # the weak labels: building becomes sky in the images the fixed draw picks, nowhere else
    from kdcache.data import build_dataset

    true, weak = (build_dataset(n, "train", None, **opts) for n in ("synthetic", "synthetic-weak-building"))
    changed = []
    for i in range(len(true)):
        a, b = true.load(i)[1], weak.load(i)[1]
        picked = np.random.default_rng((2028, i)).random() < script["WEAK_SHARE"]
        assert np.array_equal(b, np.where(a == 1, 0, a) if picked else a)
        changed.append(picked and bool((a == 1).any()))
    assert any(changed) and not all(changed)
    val_true, val_weak = (build_dataset(n, "val", None, **opts) for n in ("synthetic", "synthetic-weak-building"))
    assert all(np.array_equal(val_true.load(i)[1], val_weak.load(i)[1]) for i in range(len(val_true)))
    results = tmp_path / "results"
    monkeypatch.setitem(module, "__file__", str(results / "x" / "weak_teacher.py"))
    (results / "x" / "results").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["weak_teacher.py", "--seeds", "0,1", "--out", str(tmp_path / "w")])
    script["main"]()
    state_file = results / "x" / "results" / "weak-teacher-cpu.json"  # beside the results file
    state = _json.loads(state_file.read_text())
    assert set(state["students"]) == set(script["arms"]()) and all(set(r) == {"0", "1"} for r in state["students"].values())
    cfg = _json.loads((tmp_path / "w" / "s1-weak-teacher-kl-class-weights" / "config.json").read_text())
    assert cfg["methods"][0]["baseline"] == str(tmp_path / "w" / "s1-ce") and "kl" in cfg["class_weights"]
    assert cfg["methods"][0]["weight"] == 0.5  # the weights written out in the script, whatever the defaults
    assert _json.loads((tmp_path / "w" / "s0-weak-teacher-dist-plain" / "config.json").read_text())["methods"] == [
        {"name": "dist", "weight": 0.25}]
    assert _json.loads((tmp_path / "w" / "s0-standard-teacher-dist-mask" / "config.json").read_text())[
        "methods"][0]["mask"] == "teacher_correct"
    table = (results / "x" / "results" / "weak-teacher-cpu.md").read_text()
    ce = [f"{100 * state['students']['CE'][k]['miou']:.2f}" for k in ("0", "1")]
    for row in ("| CE | 2 | ", f" | {ce[0]}, {ce[1]} | ", "| weak teacher, KL mask − plain | 2 |",
                "| standard teacher, DIST class weights − plain | 2 |", "| building (weak) |",
                "Best teacher-aware variant on val (weak teacher): KL: ", "| weak teacher, KL class weights | ",
                "| method | variant | seeds | weak teacher: Δ mIoU |"):
        assert row in table, row
    assert all(len(r["weights"]) == 11 for r in state["students"]["weak teacher, DIST class weights"].values())
    # --setting seed: KL only at T = 4, weight 1; the same kept teachers; the defaults' CE runs scored, not trained
    monkeypatch.setattr(sys, "argv", ["weak_teacher.py", "--seeds", "0", "--out", str(tmp_path / "ws"),
                                      "--setting", "seed", "--ce-runs", str(tmp_path / "w")])
    script["main"]()
    seed_state = _json.loads((results / "x" / "results" / "weak-teacher-seed-cpu.json").read_text())
    # the weak teacher: plain and every teacher-aware variant; the standard one: plain and the variant with the best
    # mean val mIoU on the weak teacher, chosen once and recorded
    weak_arms = {f"weak teacher, KL {v}" for v in ("plain", "mask", "class weights", "rectify")}
    vals = {v: seed_state["students"][f"weak teacher, KL {v}"]["0"]["val"] for v in ("mask", "class weights", "rectify")}
    chosen = max(vals, key=vals.get)
    assert seed_state["chosen"] == {"variants": {"kl": chosen}, "seeds": [0]}
    assert set(seed_state["students"]) == {"CE", "standard teacher, KL plain", f"standard teacher, KL {chosen}"} | weak_arms
    assert seed_state["students"]["CE"]["0"] == state["students"]["CE"]["0"]  # the same run, scored again
    assert not (tmp_path / "ws" / "s0-ce").exists()
    assert seed_state["teachers"] == state["teachers"]  # the kept teachers, read
    seed_cfg = lambda arm: _json.loads((tmp_path / "ws" / f"s0-seed-{arm}" / "config.json").read_text())  # noqa: E731
    assert seed_cfg("weak-teacher-kl-plain")["methods"] == [{"name": "kl", "weight": 1.0, "temperature": 4.0}]
    assert seed_cfg("weak-teacher-kl-class-weights")["methods"][0]["baseline"] == str(tmp_path / "w" / "s0-ce")
    assert seed_cfg("weak-teacher-kl-rectify")["methods"] == [{"name": "kl", "weight": 1.0, "temperature": 4.0,
                                                               "rectify": "swap"}]
    seed_table = (results / "x" / "results" / "weak-teacher-seed-cpu.md").read_text()
    assert "plain against teacher-aware KD: KL at T = 4, KD weight 1" in seed_table and f"over the weak teacher's seeds 0: KL: {chosen}." in seed_table
    assert "| weak teacher, KL rectify − plain | 1 |" in seed_table
    (tmp_path / "w2" / "s1-ce").mkdir(parents=True)  # no finished CE run there: refused, nothing trained into it
    monkeypatch.setattr(sys, "argv", ["weak_teacher.py", "--seeds", "0,1", "--out", str(tmp_path / "ws"),
                                      "--setting", "seed", "--ce-runs", str(tmp_path / "w2")])
    with pytest.raises(SystemExit, match="holds no finished CE student of this recipe for seed 1"):
        script["main"]()
    assert list((tmp_path / "w2" / "s1-ce").iterdir()) == []
    # a later launch: a teacher cut short is trained again; a class-weights arm whose CE folder is gone
    # trains the CE run again; a teacher whose weights changed is refused
    import shutil


    # the teachers are kept beside the state, byte for byte; the working folder's are not read again
    kept = results / "x" / "results" / "weak-teacher-cpu-teachers"
    for name in ("weak", "standard"):
        assert (kept / name / "best.pt").read_bytes() == (tmp_path / "w" / f"teacher-{name}" / "best.pt").read_bytes()
    # another standard teacher than the kept one is refused, the kept one untouched
    before = (kept / "standard" / "best.pt").read_bytes()
    monkeypatch.setattr(sys, "argv", ["weak_teacher.py", "--seeds", "0", "--phase", "teachers", "--out",
                                      str(tmp_path / "w"), "--standard-teacher", str(kept / "weak")])
    with pytest.raises(SystemExit, match="is not the standard teacher kept in"):
        script["main"]()
    assert (kept / "standard" / "best.pt").read_bytes() == before
    shutil.rmtree(tmp_path / "w" / "teacher-standard")
    shutil.rmtree(tmp_path / "w" / "teacher-weak")
    weak_teacher = kept / "weak"
    (weak_teacher / "metrics.jsonl").write_text("")
    shutil.rmtree(tmp_path / "w" / "s0-ce")
    del state["students"]["weak teacher, KL class weights"]["0"]
    state_file.write_text(_json.dumps(state))
    monkeypatch.setattr(sys, "argv", ["weak_teacher.py", "--seeds", "0", "--out", str(tmp_path / "w")])
    script["main"]()  # the weak teacher trains again from its seed: the same weights, so the state goes on
    assert (weak_teacher / "metrics.jsonl").read_text() and (tmp_path / "w" / "s0-ce" / "best.pt").exists()
    assert not (tmp_path / "w" / "teacher-standard").exists()  # the kept standard teacher was read
    again = _json.loads(state_file.read_text())
    assert "0" in again["students"]["weak teacher, KL class weights"]
    assert again["students"]["CE"] == state["students"]["CE"]  # the recorded CE numbers stay as read
    import torch

    ckpt = torch.load(weak_teacher / "best.pt", weights_only=False)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1
    torch.save(ckpt, weak_teacher / "best.pt")
    monkeypatch.setattr(sys, "argv", ["weak_teacher.py", "--seeds", "0", "--phase", "teachers", "--out",
                                      str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="the weak teacher in .* is not the one .* was measured with"):
        script["main"]()


def test_target_cost_times_each_way_and_an_older_commits_beside_it(tmp_path, monkeypatch):
    """target_cost.py on a tiny cache: a row per way of taking the targets, the older commit's
    warp.py (here HEAD's), both ways, timed beside the current one, each against the nearest cell."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH, capture_output=True).returncode != 0:
        pytest.skip("target_cost.py --against needs a git checkout")
    monkeypatch.setattr(sys, "argv", ["target_cost.py", "--limit", "3", "--rounds", "2", "--against", "HEAD",
                                      "--data-options", "size=3,resolution=32x48", "--results", str(tmp_path)])
    runpy.run_path(str(BENCH / "target_cost.py"), run_name="__main__")
    table = (tmp_path / "target-cost-cpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| way")]
    assert [r.split(" | ")[0] for r in rows] == ["| nearest cell", "| bilinear", "| nearest cell at HEAD",
                                                 "| bilinear at HEAD"], rows
    assert rows[0].endswith("| 1.00 |") and "3 synthetic training images" in table


@pytest.mark.slow  # writes a store, times three loaders
def test_store_scale_measures_a_tiny_store_and_reports_the_jpeg_comparator(tmp_path, monkeypatch):
    """store_scale.py's phases on a 300-sample ImageNet-like store, in this process: the store holds
    what was written, opening, inspecting and verifying see every sample, the three loaders read the
    same rows, and the report's loader table has the JPEG-alone column and both shares."""
    import json as _json

    script = runpy.run_path(str(BENCH / "store_scale.py"), run_name="store_scale")
    module = script["main"].__globals__
    path = tmp_path / "s.zarr"
    w = script["phase_write"]("imagenet", 300, 0, path)
    assert w["files"] > 0 and 20 < w["map_bytes_per_sample"] < 60  # packed: 10 fp16 + 10 int16 + tail, compressed
    assert script["phase_verify"](path)["seconds"] >= 0 and script["phase_inspect"](path)["seconds"] >= 0
    monkeypatch.setitem(module["LOADER_SAMPLES"], "imagenet", 256)
    loaders = [script["phase_loader"]("imagenet", path, 0, decode, alone)
               for decode, alone in ((False, False), (True, False), (True, True))]
    assert [x["alone"] for x in loaders] == [False, False, True]
    assert len({x["samples"] for x in loaders}) == 1 and loaders[0]["samples"] > 0
    res = {"shape": "imagenet", "samples": 300, "views": 0, "machine": "test", "cores": 2, "commit": "abc1234",
           "write": w, "open": script["phase_open"](path), "inspect": {"seconds": 0.1}, "verify": {"seconds": 0.2,
           "peak_mb": 1.0}, "loader": [{**x, "workers": k, "malloc": "fixed"} for k in (0, 1, 2) for x in loaders]}
    # the JPEG alone with glibc's default malloc: a column of its own, not the comparator
    res["loader"] += [{**loaders[2], "workers": k, "malloc": "default", "samples_per_s": 1.5} for k in (0, 1, 2)]
    out = tmp_path / "results"
    out.mkdir()
    (out / "imagenet-300-v0.json").write_text(_json.dumps(res))
    monkeypatch.setitem(module, "OUT", out)
    script["report"](tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    a, j = loaders[2]["samples_per_s"], loaders[1]["samples_per_s"]
    assert f"| {a:,.0f} | " in table and f"| {100 * (1 - j / a):.1f}% |" in table
    assert "JPEG alone samples/s" in table and "commit(s) abc1234" in table
    assert f"| {a:,.0f} | 2 | " in table  # each worker count's row: the fixed JPEG alone, then glibc's default
    # the full-size table: this store's per-sample bytes and files times ImageNet-1k's images, and the rates of
    # its 2-worker loader with the JPEG (the fixed-malloc rows) and of its targets alone without workers
    full = table.split("## Extrapolated to the full data sets\n")[1]
    n_full = 1_281_167
    row = next(line for line in full.splitlines() if line.startswith("| ImageNet-1k"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["—", "300", f"{n_full * w['bytes_per_sample'] / 1e9:,.1f}"]
    assert cells[4] == f"{w['files'] / 300 * n_full:,.0f}"
    assert cells[6] == f"{0.2 / 300 * n_full / 3600:,.2f}"  # verify-cache: its seconds per sample, scaled
    assert cells[7] == f"{n_full / loaders[0]['samples_per_s'] / 3600:,.3f}"
    assert cells[8:] == [f"{j:,.0f}", f"{100 * j / loaders[0]['samples_per_s']:.1f}%"]

    # --codec: a store written with another codec holds the same targets, and its runs get a part of their own
    import numpy as np

    lz4 = script["phase_write"]("imagenet", 300, 0, tmp_path / "lz4.zarr", "blosc-lz4")
    from kdcache.store import CacheStore

    a_store, b_store = CacheStore(path), CacheStore(tmp_path / "lz4.zarr")
    assert (a_store.schema.meta["codec"], b_store.schema.meta["codec"]) == ("blosc-zstd", "blosc-lz4")
    for x, y in zip(a_store.read_block(0, 300), b_store.read_block(0, 300)):
        assert x.keys() == y.keys() and all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x)
    assert lz4["bytes_per_sample"] != w["bytes_per_sample"]
    (out / "imagenet-300-v0-blosc-lz4.json").write_text(_json.dumps({**res, "codec": "blosc-lz4", "write": lz4}))
    script["report"](tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert table.index("## imagenet-like\n") < table.index("## imagenet-like, codec blosc-lz4\n")
    assert f"| {lz4['bytes_per_sample']:,.1f} |" in table.split("codec blosc-lz4")[1]
    assert script["result_name"]("imagenet", 300, 0, "blosc-lz4") == "imagenet-300-v0-blosc-lz4.json"
    assert script["result_name"]("imagenet", 300, 0, "blosc-zstd") == "imagenet-300-v0.json"
    # codecs measured side by side in one run: a comparison of their own, kept out of the growth tables
    both = ["blosc-zstd", "blosc-lz4"]
    for codec, written in zip(both, (w, lz4)):
        name = script["result_name"]("imagenet", 300, 0, codec, True)
        (out / name).write_text(_json.dumps({**res, "codec": codec, "write": {**written, "samples_per_s": 7777.0},
                                             "side_by_side": both}))
    script["report"](tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    growth, compared = table.split("## Codecs side by side: imagenet-like, 300 samples\n")
    assert "| 7,777 |" not in growth  # the comparison's rows are not growth rows
    assert f"| blosc-lz4 | {lz4['bytes_per_sample']:,.0f} | 7,777 |" in compared
    assert f"{lz4['bytes_per_sample'] / w['bytes_per_sample']:.2f}x the bytes" in compared


@pytest.mark.slow  # trains a student per weight
def test_kd_weight_pool_trains_every_weight_and_averages_both_settings(tmp_path, monkeypatch):
    """kd_weight_pool.py on a tiny setting: CE and every (method, weight, seed) with the pool, each
    scored by its best val epoch; the state goes on where it stopped (a run in it is not trained
    again); the report chooses each method's weight (a tie keeps the weight nearest 1) and, with the
    labelled-only weights phase's state beside it, the default by the mean gain over CE of the two
    settings, checked here by hand."""
    import json as _json

    script = runpy.run_path(str(BENCH / "kd_weight_pool.py"), run_name="pool")
    module = script["main"].__globals__
    monkeypatch.setitem(module, "DATA_OPTIONS", {"resolution": [32, 48]})
    monkeypatch.setitem(module, "LABELLED", 4)
    monkeypatch.setitem(module, "POOL", 4)
    monkeypatch.setitem(module, "TEACHER", {**script["TEACHER"], "epochs": 1, "limit": 4, "batch_size": 4})
    monkeypatch.setitem(module, "STUDENT", {**script["STUDENT"], "limit": 4, "batch_size": 4})
    monkeypatch.setitem(module, "POOL_EPOCHS", 1)
    monkeypatch.setitem(module, "CE_EPOCHS", 1)
    monkeypatch.setitem(module, "WEIGHTS", (0.5, 1.0))
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setitem(module, "RESULTS", results)
    monkeypatch.setitem(module, "LABELLED_ONLY", results / "labelled-only.json")
    monkeypatch.setattr(sys, "argv", ["kd_weight_pool.py", "--out", str(tmp_path / "w")])
    script["main"]()
    state = _json.loads((results / "kd-weight-pool-cpu.json").read_text())
    want = {"CE seed 0", "CE seed 1", *(f"{m} w={w:g} seed {s}" for m in ("kl", "dist") for w in (0.5, 1.0)
                                        for s in (0, 1))}
    assert set(state["runs"]) == want
    cfg = _json.loads((tmp_path / "w" / "dist-w0.5-seed-1" / "config.json").read_text())
    assert cfg["methods"] == [{"name": "dist", "weight": 0.5}] and cfg["unlabeled_share"] == 0.5
    assert cfg["unlabeled_caches"] == [str(tmp_path / "w" / "pool.zarr")]
    assert _json.loads((tmp_path / "w" / "CE-seed-0" / "config.json").read_text())["methods"] == [{"name": "none"}]
    # a later sitting trains only what the state lacks
    del state["runs"]["kl w=1 seed 0"]
    (results / "kd-weight-pool-cpu.json").write_text(_json.dumps(state))
    stamp = (tmp_path / "w" / "dist-w0.5-seed-1" / "metrics.jsonl").stat().st_mtime_ns
    script["main"]()
    again = _json.loads((results / "kd-weight-pool-cpu.json").read_text())
    assert set(again["runs"]) == want and again["runs"]["dist w=0.5 seed 1"] == state["runs"]["dist w=0.5 seed 1"]
    assert (tmp_path / "w" / "dist-w0.5-seed-1" / "metrics.jsonl").stat().st_mtime_ns == stamp
    # the report, from a state of chosen numbers: kl's w = 0.5 and 1 tie with the pool (1 kept)
    runs = {"CE seed 0": 0.50, "CE seed 1": 0.52, "kl w=0.5 seed 0": 0.52, "kl w=0.5 seed 1": 0.54,
            "kl w=1 seed 0": 0.53, "kl w=1 seed 1": 0.53, "dist w=0.5 seed 0": 0.56, "dist w=0.5 seed 1": 0.56,
            "dist w=1 seed 0": 0.55, "dist w=1 seed 1": 0.55}
    (results / "kd-weight-pool-cpu.json").write_text(_json.dumps({"runs": {k: {"val": v} for k, v in runs.items()}}))
    # labelled only: CE 0.60; kl 0.59 (w = 0.5) / 0.58 (w = 1); dist 0.60 / 0.62
    lab = {"CE seed 0": 0.60, "CE seed 1": 0.60, "kl w=0.5 seed 0": 0.59, "kl w=0.5 seed 1": 0.59,
           "kl w=1 seed 0": 0.58, "kl w=1 seed 1": 0.58, "dist w=0.5 seed 0": 0.60, "dist w=0.5 seed 1": 0.60,
           "dist w=1 seed 0": 0.62, "dist w=1 seed 1": 0.62}
    (results / "labelled-only.json").write_text(_json.dumps({"weights": {k: {"val": v} for k, v in lab.items()}}))
    monkeypatch.setattr(sys, "argv", ["kd_weight_pool.py", "--phase", "report"])
    script["main"]()
    table = (results / "kd-weight-pool-cpu.md").read_text()
    assert "| kl | 53.00 (52.00, 54.00) | 53.00 (53.00, 53.00) | 51.00 (50.00, 52.00) | w = 1 | +2.00 |" in table
    assert "| dist | 56.00 (56.00, 56.00) | 55.00 (55.00, 55.00) | 51.00 (50.00, 52.00) | w = 0.5 | +5.00 |" in table
    # averaged gains: kl (−1 + 2) / 2 = +0.5 at w = 0.5, (−2 + 2) / 2 = 0 at w = 1; dist (0 + 5) / 2 = +2.5, (2 + 4) / 2 = +3
    assert "| kl | +0.50 (-1.00, +2.00) | +0.00 (-2.00, +2.00) | w = 0.5 |" in table
    assert "| dist | +2.50 (+0.00, +5.00) | +3.00 (+2.00, +4.00) | w = 1 |" in table


@pytest.mark.slow  # runs setup.py and a new Python process
def test_checkout_site_lays_out_every_package_setup_py_installs(tmp_path, monkeypatch):
    """gpu_check.sh runs kdcache from the checkout on a GPU machine where nothing is installed; the
    layout must hold every package the wheel holds (setup.py's own list) and import from there."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(BENCH.parent)
    runpy.run_path(str(BENCH.parent / "setup.py"), run_name="__main__")
    wheel_packages = set(captured["packages"])
    assert {"kdcache", "kdcache.kernels", "kdcache.cli"} <= wheel_packages

    site = tmp_path / "site"
    subprocess.run([sys.executable, str(BENCH / "checkout_site.py"), str(site)], check=True)
    laid_out = {".".join(p.parent.relative_to(site).parts) for p in site.rglob("__init__.py")}
    assert laid_out == wheel_packages

    probe = (
        "import importlib, sys\n"
        "site = sys.argv[1]\n"
        "for name in sys.argv[2:]:\n"
        "    path = importlib.import_module(name).__file__\n"
        "    assert path.startswith(site), (name, path)\n"
        "import kdcache.cli.app, kdcache.kernels.triton_kl\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    subprocess.run([sys.executable, "-c", probe, str(site), *sorted(wheel_packages)], check=True, cwd=tmp_path,
                   env=env)


def test_gpu_check_brings_back_the_summary_the_log_and_the_stages_in_order_of_worth(tmp_path):
    """The device tool returns at most 8 files from $OUT. Every stage's file copied as it ends, then the
    summary and the log at the end: an H200 run with all seven stage files lost its realistic-step table
    to the JSON that had ended first. copy_out, as gpu_check.sh defines it, run on made-up files."""
    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index("copy_out() {")
    body = script[start:script.index("\n}\n", start) + 3]
    res, out = tmp_path / "res", tmp_path / "out"
    res.mkdir(), out.mkdir()
    names = ["PYTEST_LOG", "KMD", "STEP_MD", "REAL_MD", "SWEEP_MD", "HOST_MD", "BUILD_MD", "KJSON", "SUMMARY", "LOG"]
    env = "".join(f'{n}="{res}/{n.lower()}.txt"\n' for n in names)
    # the stages end in gpu_check's default order with the sweep: tests, bench (KMD and KJSON), sweep,
    # build, step, realistic; the summary and the log come last
    steps = ["PYTEST_LOG", "KMD KJSON", "SWEEP_MD", "BUILD_MD", "STEP_MD", "REAL_MD"]
    run = "".join(f'for n in {s}; do eval "echo $n > \\$$n"; done; copy_out\n' for s in steps)
    bash = (f'set -euo pipefail\nOUT="{out}"\nWORK="{tmp_path}"\n{env}touch "$WORK/start"; sleep 0.05\n{body}\n'
            f'{run}echo s > "$SUMMARY"; echo l > "$LOG"; copy_out final; copy_out final\n')
    subprocess.run(["bash", "-c", bash], check=True)
    back = sorted(p.name for p in out.iterdir())
    assert len(back) == 8
    assert set(back) == {f"{n.lower()}.txt" for n in names} - {"kjson.txt", "host_md.txt"}  # host: not run
    # while the stages run, 6 at most, first come first kept
    out2 = tmp_path / "out2"
    out2.mkdir()
    bash2 = bash.replace(str(out), str(out2)).split("echo s >")[0]
    subprocess.run(["bash", "-c", bash2], check=True)
    assert sorted(p.name for p in out2.iterdir()) == sorted(
        ["pytest_log.txt", "kmd.txt", "kjson.txt", "sweep_md.txt", "build_md.txt", "step_md.txt"])


def test_checkout_site_refuses_a_setup_py_it_cannot_read(tmp_path):
    """Without setup.py's MAPPED it would lay out kdcache alone, and gpu_check.sh would fail later on
    a missing kdcache.kernels: it says so in one line instead."""
    (tmp_path / "setup.py").write_text("from setuptools import setup\nsetup(packages=['kdcache'])\n")
    site = runpy.run_path(str(BENCH / "checkout_site.py"))
    with pytest.raises(SystemExit, match=r"no MAPPED = \{\.\.\.\} in .*setup\.py; update this script"):
        site["mapped_folders"](tmp_path)


def test_checkout_commit_names_the_code_a_results_file_was_measured_with(tmp_path, monkeypatch):
    """Every benchmark names its commit through one helper: git's short HEAD, KDCACHE_COMMIT where a
    copied tree's .git is another commit's, nothing outside a checkout."""
    import subprocess

    from kdcache.core.runs import checkout_commit

    monkeypatch.delenv("KDCACHE_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH)
    if head.returncode == 0:
        assert checkout_commit(BENCH) == head.stdout.strip() != ""
    assert checkout_commit(tmp_path) == ""
    monkeypatch.setenv("KDCACHE_COMMIT", "abc1234")
    assert checkout_commit(tmp_path) == "abc1234"


@pytest.mark.slow  # trains a teacher, a grid and the finalists of each seed, at a tiny size
def test_full_budget_chooses_on_val_and_scores_the_finalists_on_test(tmp_path, monkeypatch):
    """full_budget.py on a tiny setting: the grid trains on the grid seed and reads no test score;
    the baseline and finalists are the best on val (CE's arms apart from the KD arms), plus the
    best one's teacher-aware row; the students phase scores each on test once (seed 0's grid run
    standing in), and the report pairs them against the baseline with the share of the gap."""
    import json

    monkeypatch.syspath_prepend(str(BENCH))  # it reads cached_vs_online's helpers
    script = runpy.run_path(str(BENCH / "full_budget.py"), run_name="fb")
    module = script["main"].__globals__
    monkeypatch.setitem(module, "TEACHER", {**module["TEACHER"], "epochs": 1})
    monkeypatch.setitem(module, "DATA_OPTIONS", {"size": 8, "resolution": [32, 48]})
    monkeypatch.setitem(module, "TASK", {**module["TASK"], "test_size": 6,
                                         "student": {**module["TASK"]["student"], "epochs": 1, "batch_size": 4}})
    grid = {k: module["GRID"][k] for k in ("CE", "CE cutmix", "DIST schedule", "KL w=1 schedule cutmix",
                                           "CIRKD + KL schedule", "DIST + pool")}
    monkeypatch.setitem(module, "POOL", 6)
    monkeypatch.setitem(module, "GRID", grid)
    monkeypatch.setitem(module, "SEEDS", (0, 1))
    monkeypatch.setitem(module, "FINALISTS", 1)
    state_file = tmp_path / "results" / "fb.json"
    state_file.parent.mkdir()
    argv = ["full_budget.py", "--out", str(tmp_path / "work"), "--state", str(state_file), "--pairs", "demo"]
    # two at once: a slot with no run ready builds the store a waiting run reads, in its worker
    monkeypatch.setattr(sys, "argv", [*argv, "--phase", "teacher,caches,grid", "--jobs", "2"])
    script["main"]()
    state = json.loads(state_file.read_text())
    assert state["caches"]["image"]["jobs"] == 1  # the caches phase builds it here
    schedules = {k: v for k, v in state["caches"].items() if k.startswith("schedule")}
    assert {"schedule seed 0", "schedule cutmix seed 0", "schedule features seed 0"} <= set(schedules)
    assert all(v["jobs"] == 2 and v["threads"] == 1 and v["seconds"] > 0 for v in schedules.values())
    best = max(("DIST schedule", "KL w=1 schedule cutmix", "CIRKD + KL schedule", "DIST + pool"),
               key=lambda arm: state["runs"][f"demo | {arm} | seed 0"]["val"])
    # the grid, CE for twice the epochs, and the best KD arm for twice the epochs (its schedule as long)
    assert set(state["runs"]) == {f"demo | {arm} | seed 0" for arm in (*grid, "CE 2x epochs", f"{best} 2x epochs")}
    cfg = json.loads((tmp_path / "work" / f"demo-{best.lower().replace('=', '').replace(' ', '-')}-2x-epochs-s0"
                      / "config.json").read_text())
    # twice the students' one epoch (a pool arm trains half of them: round(2 / 2))
    assert cfg["epochs"] == (1 if best == "DIST + pool" else 2) and cfg["methods"] == json.loads((tmp_path / "work" / (
        f"demo-{best.lower().replace('=', '').replace(' ', '-')}-s0") / "config.json").read_text())["methods"]
    if cfg["cache_targets"] == "schedule":
        assert CacheStore(cfg["cache"]).schema.schedule["epochs"] == 2 and "-2x" in cfg["cache"]
    assert "Does the best KD recipe keep its lead for twice the epochs?" in (tmp_path / "results" / "fb.md").read_text()
    assert not any("score" in r for r in state["runs"].values())  # the grid reads val alone
    assert (tmp_path / "results" / "fb-teacher" / "best.pt").exists() and "score" in state["teacher"]
    cfg = json.loads((tmp_path / "work" / "demo-kl-w1-schedule-cutmix-s0" / "config.json").read_text())
    assert cfg["mix"] == "cutmix" and cfg["cache_targets"] == "schedule" and cfg["methods"][0]["weight"] == 1.0
    cfg = json.loads((tmp_path / "work" / "demo-cirkd-+-kl-schedule-s0" / "config.json").read_text())
    assert [m["name"] for m in cfg["methods"]] == ["cirkd", "kl"] and cfg["cache_targets"] == "schedule"
    assert "stage3" in CacheStore(str(tmp_path / "work" / "schedule-features-s0.zarr")).schema.features
    cfg = json.loads((tmp_path / "work" / "demo-ce-2x-epochs-s0" / "config.json").read_text())
    assert cfg["epochs"] == 2 and len(state["runs"]["demo | CE 2x epochs | seed 0"]["val_curve"]) == 2
    assert "Has CE levelled off? CE for 1 epochs" in (tmp_path / "results" / "fb.md").read_text()
    cfg = json.loads((tmp_path / "work" / "demo-dist-+-pool-s0" / "config.json").read_text())
    pool = CacheStore(str(tmp_path / "work" / "pool.zarr"))
    assert cfg["unlabeled_caches"] == [str(pool.path)] and cfg["unlabeled_share"] == 0.5
    assert pool.schema.num_samples == 6 and pool.schema.dataset["split"] == "unlabeled"
    vals = {arm: state["runs"][f"demo | {arm} | seed 0"]["val"] for arm in grid}
    # a run whose record was lost (the sitting stopped after its last.pt) resumes in the next sitting
    lost = state["runs"].pop("demo | DIST schedule | seed 0")
    state_file.write_text(json.dumps(state))
    monkeypatch.setattr(sys, "argv", [*argv, "--phase", "teacher,caches,grid"])  # one at a time
    script["main"]()
    again = json.loads(state_file.read_text())["runs"]["demo | DIST schedule | seed 0"]
    assert again["resumed_after_epochs"] == 1 and again["val_curve"] == lost["val_curve"]
    state = json.loads(state_file.read_text())
    ce, kd = script["finalists"](state, "demo")
    assert ce == max(("CE", "CE cutmix"), key=vals.get)
    best = max(("DIST schedule", "KL w=1 schedule cutmix", "CIRKD + KL schedule", "DIST + pool"), key=vals.get)
    assert kd == [best, f"{best} + teacher-aware"]
    # the baseline's grid run lost its folder (a new working folder): trained again for its test score,
    # the grid's val (on which it was chosen) kept
    import shutil

    shutil.rmtree(tmp_path / "work" / f"demo-{ce.lower().replace(' ', '-')}-s0")
    # two runs at once, one thread each (worker processes): the same records
    monkeypatch.setattr(sys, "argv", [*argv, "--phase", "students", "--jobs", "2"])
    script["main"]()
    state = json.loads(state_file.read_text())
    base = state["runs"][f"demo | {ce} | seed 0"]
    assert base["val"] == vals[ce] and "score" in base and base["trained_again"]["threads"] == 1
    assert "score" not in base["trained_again"] and len(base["trained_again"]["val_curve"]) == 1
    assert (tmp_path / "work" / f"demo-{ce.lower().replace(' ', '-')}-s0" / "best.pt").exists()
    assert "Trained again for their test scores" in (tmp_path / "results" / "fb.md").read_text()
    assert "trained_again" not in state["runs"][f"demo | {kd[0]} | seed 0"]
    for arm in (ce, *kd):
        for sd in (0, 1):
            assert state["runs"][f"demo | {arm} | seed {sd}"]["num_samples"] == 6
        assert state["runs"][f"demo | {arm} | seed 1"]["threads"] == 1
    aware = json.loads((tmp_path / "work" / f"demo-{kd[1].lower().replace('=', '').replace(' ', '-')}-s1"
                        / "config.json").read_text())
    # the teacher-aware row masks its logit method; a feature method beside it is left as it was
    assert [m.get("mask") for m in aware["methods"]] == ([None, "teacher_correct"] if best.startswith("CIRKD")
                                                         else ["teacher_correct"])
    report = (tmp_path / "results" / "fb.md").read_text()
    assert f"Chosen on val: baseline {ce}; finalists {kd[0]}, {kd[1]}." in report
    assert f"| {kd[0]} − {ce} | 2 |" in report and "share of the teacher–CE gap" in report
    assert "## Does mixing pay here?" in report and f"| CE | demo | {100 * vals['CE']:.2f} |" in report


def test_full_budget_pairs_each_recipe_with_its_mixed_twin(monkeypatch):
    """"Does mixing pay here?": each grid arm with mixing beside the arm of the same method spec
    whose form is the same without it (CE: the whole-image form both)."""
    monkeypatch.syspath_prepend(str(BENCH))  # it reads cached_vs_online's helpers
    script = runpy.run_path(str(BENCH / "full_budget.py"), run_name="fb")
    assert script["mixing_pairs"](script["GRID"]) == [
        ("CE", "CE cutmix"), ("DIST schedule", "DIST schedule cutmix"), ("DIST w=1 schedule", "DIST w=1 schedule cutmix"),
        ("CWD schedule", "CWD schedule cutmix")]
    assert ("KL schedule mixup", "KL w=4 schedule mixup") not in script["mixing_pairs"](script["CLS_GRID"])
    assert ("KL schedule", "KL schedule mixup") in script["mixing_pairs"](script["CLS_GRID"])
    assert ("KL T=1 w=1 schedule", "KL T=1 w=1 schedule mixup") in script["mixing_pairs"](script["CLS_GRID"])


def test_demo_recipe_chooses_on_the_mean_val_and_pairs_the_choice_on_test(tmp_path, monkeypatch):
    """demo_recipe.py's choice and report, from a made-up state: nothing is chosen until every
    candidate has every seed; then the CE arm and the (teacher, KD arm) of the best mean val (not
    the best single seed), and the test table pairs them seed by seed."""
    monkeypatch.syspath_prepend(str(BENCH))
    script = runpy.run_path(str(BENCH / "demo_recipe.py"), run_name="dr")
    seeds, kd_arms, teachers = script["SEEDS"], script["KD_ARMS"], script["TEACHER_EPOCHS"]
    runs = {f"{arm} | seed {s}": {"val": 0.30 + 0.01 * (arm == "CE cutmix"), "seconds": 1.0}
            for arm in script["CE_ARMS"] for s in seeds}
    for i, (arm, teacher) in enumerate((a, t) for t in teachers for a in kd_arms):
        for s in seeds:
            runs[f"{arm} | {teacher} | seed {s}"] = {"val": 0.31 + 0.001 * i, "seconds": 1.0}
    first_kd, first_teacher = next(iter(kd_arms)), next(iter(teachers))
    # the best single seed, not the best mean
    runs[f"{first_kd} | {first_teacher} | seed 0"]["val"] = 0.4
    for s in seeds:
        runs[f"{first_kd} | {first_teacher} | seed {s}"]["val"] -= 0.05 if s else 0.0
    state = {"runs": dict(runs)}
    del state["runs"][f"CE | seed {seeds[-1]}"]
    assert script["choose"](state) is None
    state["runs"] = runs
    last = f"{list(kd_arms)[-1]} | {list(teachers)[-1]}"
    assert script["choose"](state) == {"ce": "CE cutmix", "kd": last}
    state["choice"] = script["choose"](state)
    for s in seeds:
        runs[f"CE cutmix | seed {s}"]["test"] = {name: 0.30 for name in script["TEST"]}
        runs[f"{last} | seed {s}"]["test"] = {name: 0.30 + 0.01 * (s + 1) for name in script["TEST"]}
    path = tmp_path / "dr.md"
    script["write_report"](state, path)
    text = path.read_text()
    assert f"**Chosen on val**: the baseline `CE cutmix` and `{last}`." in text
    assert "| demo test (100 images) | 30.00, 31.00, +1.00 | 30.00, 32.00, +2.00 | 30.00, 33.00, +3.00 | +2.00 [" in text


def test_digit_images_keep_a_share_of_the_training_labels_and_the_same_val_and_test(tmp_path, monkeypatch):
    """``digits-few``'s data: the same val and test as ``digits``, and of each class's training
    images only the first share keeps its label (at least one); the others lie in the unlabelled
    split, under their index alone, none in two splits."""
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCH))  # it reads cached_vs_online's helpers
    script = runpy.run_path(str(BENCH / "full_budget.py"), run_name="fb")
    rng = np.random.default_rng(3)
    targets = np.repeat(np.arange(10), 20)
    images = rng.integers(0, 17, (200, 8, 8)).astype(np.float64)

    def layout(root):
        return {p.relative_to(root).as_posix() for p in root.rglob("*.png")}

    full = layout(script["write_digit_images"](images, targets, tmp_path / "full"))
    few = layout(script["write_digit_images"](images, targets, tmp_path / "few", 0.1))
    assert {f for f in few if not f.startswith(("train/", "unlabeled/"))} == {f for f in full if not f.startswith("train/")}
    train = {f for f in full if f.startswith("train/")}
    for c in range(10):  # 12 training images a class (60% of 20): round(1.2) = 1 keeps its label
        mine = sorted(f for f in few if f.startswith(f"train/{c}/"))
        assert len(mine) == 1 and mine[0] in train
    unlabelled = {f.split("/")[-1] for f in few if f.startswith("unlabeled/")}
    assert len(unlabelled) == 110 and all(f.count("/") == 1 for f in few if f.startswith("unlabeled/"))
    assert unlabelled | {f.split("/")[-1] for f in few if f.startswith("train/")} == {f.split("/")[-1] for f in train}
    # each image is the scan's own pixels, upsampled: the unlabelled file of index i is digits' i
    from PIL import Image

    name = sorted(unlabelled)[0]
    cls = int(targets[int(name[:4])])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "few" / "unlabeled" / name)),
                          np.asarray(Image.open(tmp_path / "full" / "train" / str(cls) / name)))


def test_a_run_validated_every_nth_epoch_counts_every_epoch_it_trained(tmp_path, monkeypatch):
    """``--eval-every``: a run's record has the validated epochs' curve and every epoch trained; it
    is finished once every epoch is logged, validated or not."""
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    script = runpy.run_path(str(BENCH / "cached_vs_online.py"), run_name="cvo")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    log = [{"epoch": e, "train_loss": 1.0, "train_images_per_s": 100.0 + e,
            **({"val_miou": 0.1, "val_top1": 0.5 + e / 100} if (e + 1) % 3 == 0 else {})} for e in range(5)]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, log)) + "\n")
    task = {"score": "top1", "student": {"epochs": 6}}
    assert not script["finished"](task, run)  # five of six epochs
    log.append({"epoch": 5, "train_loss": 1.0, "train_images_per_s": 105.0, "val_miou": 0.1, "val_top1": 0.55})
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, log)) + "\n")
    assert script["finished"](task, run)
    r = script["run_record"](task, run)
    assert r["val_curve"] == [0.52, 0.55] and r["val"] == 0.55 and r["epochs"] == 6 and r["images_per_s"] == 102.5


@pytest.mark.slow  # a process of its own that compiles a generated kernel (5 s)
def test_numba_register_probe_matches_the_production_kernel_before_timing(tmp_path):
    """numba_register_probe.py on a tiny map, in a process of its own: the generated (C, k) kernel's loss and
    gradient agree with kl_spatial's before they are timed, and a row is written for the case."""
    import re

    out = tmp_path / "probe.md"
    r = subprocess.run([sys.executable, str(BENCH / "numba_register_probe.py"), "--cases", "1:5:16x32", "--ks", "2",
                        "--repeats", "2", "--markdown", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 1×5×16×32 | 2 |"))
    loss_diff, grad_diff = map(float, re.search(r"\| ([\d.e+-]+) / ([\d.e+-]+) \|", row).groups())
    assert loss_diff < 1e-6 and grad_diff < 1e-5, row


def test_numba_variants_alternate_takes_the_sides_in_turn_and_finds_its_constant(monkeypatch, tmp_path):
    """The timing every module-copy benchmark shares: two warm calls a side, then rounds whose order
    reverses every other round, each call timed right after its side's set-up; and a constant the
    kernels' module does not hold is a one-line stop, not a silent copy of the unchanged module."""
    monkeypatch.syspath_prepend(str(BENCH))
    script = runpy.run_path(str(BENCH / "numba_variants.py"), run_name="nv")
    order = []
    current = []
    sides = {"a": lambda: current.__setitem__(slice(None), ["a"]),
             "b": lambda: current.__setitem__(slice(None), ["b"])}
    times = script["alternate"](sides, lambda: order.append(current[0]), 3)
    assert order == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]
    assert sorted(times) == ["a", "b"] and all(len(t) == 3 for t in times.values())
    cells = script["ratio_cells"]({"a": [2.0, 4.0, 6.0, 8.0], "b": [1.0, 2.0, 3.0, 4.0]})
    assert cells.startswith("5.00 | 2.50 | **2.00×**"), cells
    with pytest.raises(SystemExit, match="NO_SUCH_CONSTANT"):
        script["load_copy"]("NO_SUCH_CONSTANT", "1", tmp_path)
    # a setting of several constants, the host's (kernels/api.py) apart and parsed as Python values
    assert script["parse_setting"]("SCRATCH_ALIGN=32, api.GRAD_ALIGN=16") == ([("SCRATCH_ALIGN", "32")],
                                                                             {"GRAD_ALIGN": 16})
    with pytest.raises(SystemExit, match="no constant 'NOPE'"):
        script["parse_setting"]("api.NOPE=1")
    copy = script["load_copy"]("SCRATCH_ALIGN", "32", tmp_path, (("VECTOR_WIDTH", "256"),))
    assert (copy.SCRATCH_ALIGN, copy.VECTOR_WIDTH) == (32, 256)
    # the module as a commit has it: the first commit that has the file, its constants as they were
    first = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", "kernels/numba_kl.py"], cwd=BENCH.parent,
                           capture_output=True, text=True, check=True).stdout.split()[-1]
    old = script["load_copy"]("@", first, tmp_path)
    was = subprocess.run(["git", "show", f"{first}:kernels/numba_kl.py"], cwd=BENCH.parent, capture_output=True,
                         text=True, check=True).stdout
    assert Path(old.__file__).read_text() == was and not hasattr(old, "SCRATCH_ALIGN")
    assert script["parse_setting"](f"@{first},VECTOR_WIDTH=256") == ([("@", first), ("VECTOR_WIDTH", "256")], {})
    with pytest.raises(SystemExit, match="no kernels/numba_kl.py at 'nosuchcommit'"):
        script["load_copy"]("@", "nosuchcommit", tmp_path)


@pytest.mark.slow  # spawns a DataLoader worker three times
def test_kept_workers_times_every_trainer_and_reports_the_ratio_to_ce(small_store, tmp_path, monkeypatch):
    """kept_workers.py at a tiny size: one row per trainer, first epochs apart, and a × CE column that
    is the later epoch's seconds over CE's (one round: its own ratio); the trainers are built as their
    commands build them, the kept one with workers kept, the other started every epoch."""
    import re

    import kdcache.train.student_batches as student_batches

    _, store = small_store
    out = tmp_path / "kw.md"
    monkeypatch.setattr(student_batches, "worker_start_method", student_batches.worker_start_method)  # restored after
    monkeypatch.setattr(sys, "argv", ["kept_workers.py", "--cache", str(store), "--limit", "8", "--workers", "1",
                                      "--rounds", "1", "--out", str(out)])
    script = runpy.run_path(str(BENCH / "kept_workers.py"), run_name="kw")
    script["main"]()
    text = out.read_text()
    rows = {m[0]: [float(x) for x in m[1:4]] + [float(m[5])]
            for m in re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)–([\d.]+) \| ([\d.]+) \|$", text, re.M)}
    assert list(rows) == list(script["VARIANTS"])
    ce = rows["CE only, forked workers"][1]
    for first, later, low, ratio in rows.values():  # (seconds printed to 0.01 s: the ratio's rounding)
        assert first > 0 and later == low and abs(ratio - later / ce) <= 0.01 + later / ce * (0.005 / ce + 0.005 / later)
    assert f"**{rows['kl, spawned workers kept'][3]:.2f}×** a CE epoch" in text and "--workers 1 --rounds 1" in text


def test_random_access_batches_reads_item_by_item_and_the_batch_at_once(small_store, tmp_path, monkeypatch):
    """random_access_batches.py at a tiny size: a row per cache, each added time the kl epoch less none's
    (one round: its own difference), and only the batch-at-once loader reads through read_rows."""
    import re

    _, store = small_store
    calls = []
    original = CacheStore.read_rows
    monkeypatch.setattr(CacheStore, "read_rows", lambda self, rows, **kw: calls.append(len(rows))
                        or original(self, rows, **kw))
    run_script("random_access_batches.py", "--cache", store, "--small-limit", 8, "--many", 8, "--per-shard", 4,
               "--rounds", 1, "--results", tmp_path, monkeypatch=monkeypatch)
    text = (tmp_path / "random-access-batches-cpu.md").read_text()
    rows = re.findall(r"^\| (8 images, \d shards? of \d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \(.*?\) \| "
                      r"(-?[\d.]+) \(.*?\) \|$", text, re.M)
    assert [r[0] for r in rows] == ["8 images, 1 shard of 8", "8 images, 2 shards of 4"], text
    for _, none, item, batch, add_item, add_batch in rows:
        assert abs(float(add_item) - (float(item) - float(none))) <= 0.11
        assert abs(float(add_batch) - (float(batch) - float(none))) <= 0.11
    # 2 epochs (warm-up and one round) of a batch of 8 a cache, read at once by one loader alone
    assert calls == [8] * 4
