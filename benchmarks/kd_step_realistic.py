"""A realistic student's training step with and without the cached KD term, on a GPU (or the CPU).

    python benchmarks/kd_step_realistic.py --device cuda

DeepLabV3-MobileNetV3-Large (torchvision, random weights: nothing is downloaded), 19 classes,
batch 8 at 512×1024, fp16 autocast; the cached teacher is top-4 + tail at 1/8 of the input (64×128),
fp16 values, uint8 ids, as a cache built with the defaults holds. Per step: forward, loss, backward,
AdamW step; the KD step adds ``kl`` (kdcache's method, the path ``train-student`` runs) and copies
its targets from pinned host memory as the loader hands them over. Medians of alternating rounds,
CUDA events around each step.

Also measured, in the same run:
* the CUDA kernels one step launches (torch.profiler), CE step and KD step, and their difference;
* host synchronisations inside a KD step (``torch.cuda.set_sync_debug_mode``: each one warns);
* ``torch.compile(fullgraph=True)`` of the KD term, forward and backward: a graph break fails it.

Writes benchmarks/results/kd-step-realistic-<device slug>.md.
"""

from __future__ import annotations

import argparse
import statistics
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kdcache.core.runs import checkout_commit, device_name, device_slug
from kdcache.core.topk import topk_targets
from kdcache.methods import METHODS
from kdcache.models import ModelOutput


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", default="512x1024")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    dev = torch.device(args.device)
    H, W = map(int, args.size.split("x"))
    N, C, k = args.batch_size, 19, 4
    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=C, aux_loss=False).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(N, 3, H, W, device=dev)
    y = torch.randint(0, C, (N, H, W), device=dev)
    v, i, tail = topk_targets(torch.randn(N, C, H // 8, W // 8) * 3, k)
    host = {"kd/values": v.half(), "kd/indices": i.to(torch.uint8), "kd/tail": tail.half(),
            "kd/ignore": torch.zeros(N, H // 8, W // 8, dtype=torch.bool)}
    if dev.type == "cuda":
        host = {key: t.pin_memory() for key, t in host.items()}
    method = METHODS.get("kl")(weight=0.5).to(dev)
    amp = dev.type == "cuda"

    def kd_batch():
        return {key: t.to(dev, non_blocking=True) for key, t in host.items()}

    def step(kd: bool):
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            out = model(x)["out"]
            loss = F.cross_entropy(out, y, ignore_index=255)
            if kd:
                loss = loss + method(SimpleNamespace(logits=out), kd_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(kd: bool) -> float:
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(kd)
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        import time

        t0 = time.perf_counter()
        step(kd)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(3):
        step(False)
        step(True)
    times = {"CE only": [], "CE + KL, cache": []}
    for _ in range(args.rounds):
        for name, kd in (("CE only", False), ("CE + KL, cache", True)):
            for _ in range(args.steps):
                times[name].append(timed(kd))
    med = {n: statistics.median(t) for n, t in times.items()}
    ratio = med["CE + KL, cache"] / med["CE only"]

    kernels = {}
    syncs, syncs_note = "not measured", "no CUDA"
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, kd in (("CE only", False), ("CE + KL, cache", True)):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step(kd)
                torch.cuda.synchronize()
            kernels[name] = sum(1 for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
                                and "Memset" not in e.name)
        # the student's forward and the batch first: only the KD term's own forward and backward are watched
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)["out"]
        kd_batch_ = kd_batch()
        logits = out.detach().requires_grad_(True)
        torch.cuda.synchronize()
        syncs, _ = host_syncs(lambda: method(SimpleNamespace(logits=logits), kd_batch_).backward())
        # the same count around a deliberate sync: a check that counts nothing there proves nothing
        control_syncs, _ = host_syncs(lambda: logits.detach().sum().item())
        syncs = f"{syncs}" + ("" if control_syncs.startswith("1 ") else
                              f" (but a deliberate .item() counted {control_syncs}: the count is not to be trusted)")
        syncs_note = f"the same count around one deliberate `.item()`: {control_syncs}"

    # torch.compile of the KD term, with a graph break an error
    try:
        logits = torch.randn(N, C, H // 8, W // 8, device=dev, requires_grad=True)
        batch = kd_batch()
        def term(s):  # the model's own output type, as a compiled model's forward makes it
            return method(ModelOutput(logits=s), batch)

        compiled = torch.compile(term, fullgraph=True)
        got = compiled(logits)
        got.backward()
        g_compiled = logits.grad.clone()
        logits.grad = None
        want = method(SimpleNamespace(logits=logits), batch)
        want.backward()
        same = torch.allclose(got, want, rtol=1e-5, atol=1e-6) and torch.allclose(g_compiled, logits.grad, rtol=1e-4,
                                                                                   atol=1e-7)
        compiled_line = f"ran with fullgraph=True (no graph break); loss and gradient match eager: {same}"
    except Exception as exc:  # reported, not hidden
        compiled_line = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    slug = args.tag or device_slug(dev)
    lines = [
        "# Training step time, a realistic student: DeepLabV3-MobileNetV3-Large\n",
        f"batch {N} at {H}×{W}, 19 classes, cache grid {H // 8}×{W // 8} (top-{k} + tail, fp16 / uint8), "
        f"{'fp16 autocast, ' if amp else ''}AdamW; median of {args.rounds} alternating rounds × {args.steps} steps. "
        f"Machine: {device_name(dev)}. Commit {checkout_commit() or 'unknown'}. Made by `python benchmarks/kd_step_realistic.py`.\n",
        "| step | median ms |", "|---|---|",
        *[f"| {n} | {m:.2f} |" for n, m in med.items()],
        "",
        f"cached-KD step / CE-only step = **{ratio:.3f}** (target ≤ 1.05).",
        "",
    ]
    if kernels:
        lines += [f"CUDA kernels a step launches (torch.profiler, copies and memsets left out): CE only "
                  f"{kernels['CE only']}, with the KD term {kernels['CE + KL, cache']}: the KD term adds "
                  f"**{kernels['CE + KL, cache'] - kernels['CE only']}** (its interpolation of the logits to the cache "
                  f"grid and its backward, the loss's forward and backward launches, the sum into the total loss).", ""]
    lines += [f"Host synchronisations in one KD term's forward and backward: **{syncs.strip()}** ({syncs_note.strip()}).", "",
              f"`torch.compile` of the KD term: {compiled_line}."]
    path = Path(args.results) / f"kd-step-realistic-{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def host_syncs(fn) -> tuple[str, list]:
    """The host synchronisations ``fn()`` makes on CUDA, counted with ``torch.cuda.set_sync_debug_mode``
    (each one warns), as "N (at stack; stack)", each stack the innermost four Python frames where the
    sync was raised. Warnings raised by ``set_sync_debug_mode`` itself (torch warns when the mode is
    turned on) are not syncs and are left out."""
    stacks = []

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        if "synchroniz" in str(message):
            if stack and stack[-1].name == "set_sync_debug_mode":
                print(f"host_syncs: left out, raised by set_sync_debug_mode itself: {str(message)[:300]}")
            else:
                stacks.append(stack)

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = [" ← ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} ({f.name})"
                        for f in reversed(stack[-4:])) for stack in stacks]
    return str(len(where)) + (f" (at {'; '.join(where)})" if where else " "), stacks


if __name__ == "__main__":
    main()
