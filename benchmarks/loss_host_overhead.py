"""Host time of one KD loss call (forward + backward) on the CUDA path, with the two kernel launches
mocked: what Python and PyTorch's dispatch cost before the GPU does anything.

    python benchmarks/loss_host_overhead.py

A small student's step on a GPU is bound by the host (benchmarks/results/kd-step-time-*.md), so these
microseconds add to it one for one. Two ways into the same kernels, timed in alternating rounds in one
process on CPU tensors (``TRITON_INTERPRET=1`` so that Triton imports without a GPU; the launches
themselves are replaced by no-ops): ``eager``, the plain autograd function that ``topk_kl`` uses in
eager code, and ``custom op``, the ``torch.library`` operators that ``torch.compile`` traces. Also the
whole ``kl`` method with logits at the cache grid (the teacher-aware plumbing and the loss). Medians of
the rounds' means. Writes benchmarks/results/loss-host-overhead-cpu.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from kdcache.core.runs import checkout_commit, device_name  # noqa: E402
from kdcache.core.topk import topk_targets  # noqa: E402
from kdcache.kernels import topk_kl, triton_kl, triton_op  # noqa: E402
from kdcache.methods import METHODS  # noqa: E402
from kdcache.methods import kl as kl_module  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    for name in ("_map_fwd", "_map_bwd"):
        setattr(triton_kl, name, _NoLaunch())
    torch.manual_seed(0)
    s = torch.randn(8, 19, 64, 128)
    v, i, tail = topk_targets(torch.randn(8, 19, 64, 128) * 3, 4)
    v, i, tail = v.half(), i.to(torch.uint8), tail.half()
    ign = torch.zeros(8, 64, 128, dtype=torch.bool)
    batch = {"kd/values": v, "kd/indices": i, "kd/tail": tail, "kd/ignore": ign}
    method = METHODS.get("kl")(weight=0.5)
    # the method calls topk_kl with backend "auto", which picks Numba for CPU tensors: here, the CUDA path
    kl_module.topk_kl = functools.partial(topk_kl, backend="triton")
    seed = torch.ones(())

    def eager():
        x = s.detach().requires_grad_(True)
        topk_kl(x, v, i, tail, ignore_mask=ign, check_inputs=False, backend="triton", weight=0.5).backward(seed)

    def custom_op():
        x = s.detach().requires_grad_(True)
        triton_op.topk_kl_forward(x, v, i, tail, ign, None, 1.0, True, "mean", 255, 0.5, 1.0)[0].backward(seed)

    def method_call():
        x = s.detach().requires_grad_(True)
        with torch.autocast("cpu", enabled=False):
            method(SimpleNamespace(logits=x), batch).backward(seed)

    paths = {"topk_kl, eager (autograd function)": eager, "topk_kl, custom operators": custom_op,
             "the kl method, eager": method_call}
    for fn in paths.values():
        for _ in range(20):
            fn()
    means = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            means[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    med = {name: statistics.median(m) for name, m in means.items()}
    head = checkout_commit()
    lines = ["# Host time of one KD loss call, launches mocked\n",
             f"Machine: {device_name(torch.device('cpu'))}. Commit {head}. Forward + backward of the loss on an "
             f"8×19×64×128 student (a top-4 cache grid), the two Triton launches replaced by no-ops; the kl method "
             f"row calls the method with logits already at the grid (its teacher-aware plumbing and the loss, on the "
             f"Triton path as on a GPU). Median over "
             f"{args.rounds} alternating rounds of the mean of {args.calls} calls. Made by "
             f"`python benchmarks/loss_host_overhead.py`.\n",
             "| path | µs a call | min–max over rounds |", "|---|---|---|",
             *[f"| {name} | {med[name]:.0f} | {min(m):.0f}–{max(m):.0f} |" for name, m in means.items()],
             "",
             f"custom operators / eager = **{med['topk_kl, custom operators'] / med['topk_kl, eager (autograd function)']:.2f}**: "
             "why eager code takes the autograd function and only traced code the operators."]
    path = Path(args.results) / "loss-host-overhead-cpu.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
