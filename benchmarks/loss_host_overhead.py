"""Host time of one KD loss call (forward + backward) on the CUDA path: what Python, PyTorch's dispatch
and Triton's launcher cost before and around the GPU's work.

    python benchmarks/loss_host_overhead.py                  # CPU: the two launches mocked
    python benchmarks/loss_host_overhead.py --device cuda    # a GPU: real launches, and where the time goes

A small student's step on a GPU is bound by the host (benchmarks/results/kd-step-time-*.md), so these
microseconds add to it one for one. Ways into the same kernels, timed in alternating rounds in one
process: ``eager``, the plain autograd function that ``topk_kl`` uses in eager code, and ``custom op``,
the ``torch.library`` operators that ``torch.compile`` traces; also the whole ``kl`` method with logits
at the cache grid (the teacher-aware plumbing and the loss). Medians of the rounds' means.

On the CPU (``TRITON_INTERPRET=1`` so that Triton imports without a GPU) the launches are replaced by
no-ops: kdcache's and PyTorch's share alone. On a GPU the launches are real (an 8×19×64×128 student
takes the GPU a few microseconds, so the host sets the pace; the queue is drained once a round), one
more row times the two launches alone (``triton_kl.forward`` and ``backward`` on buffers made once:
Triton's launcher without kdcache's wrapper), and a cProfile of the eager calls lists the functions
that hold the host. Writes benchmarks/results/loss-host-overhead-cpu.md, or -<gpu>.md on CUDA.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if "cuda" not in sys.argv:  # the CPU mode: Triton imports through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from kdcache.core.runs import checkout_commit, device_name, device_slug  # noqa: E402
from kdcache.core.topk import topk_targets  # noqa: E402
from kdcache.kernels import topk_kl, triton_kl, triton_op  # noqa: E402
from kdcache.methods import METHODS  # noqa: E402
from kdcache.methods import kl as kl_module  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA GPU")
    dev = torch.device(args.device)
    if not cuda:
        for name in ("_map_fwd", "_map_bwd"):
            setattr(triton_kl, name, _NoLaunch())
    torch.manual_seed(0)
    s = torch.randn(8, 19, 64, 128, device=dev)
    v, i, tail = topk_targets(torch.randn(8, 19, 64, 128, device=dev) * 3, 4)
    v, i, tail = v.half(), i.to(torch.uint8), tail.half()
    ign = torch.zeros(8, 64, 128, dtype=torch.bool, device=dev)
    batch = {"kd/values": v, "kd/indices": i, "kd/tail": tail, "kd/ignore": ign}
    method = METHODS.get("kl")(weight=0.5)
    # the method calls topk_kl with backend "auto", which picks Numba for CPU tensors: here, the CUDA path
    kl_module.topk_kl = functools.partial(topk_kl, backend="triton")
    seed = torch.ones((), device=dev)

    def eager():
        x = s.detach().requires_grad_(True)
        topk_kl(x, v, i, tail, ignore_mask=ign, check_inputs=False, backend="triton", weight=0.5).backward(seed)

    def custom_op():
        x = s.detach().requires_grad_(True)
        triton_op.topk_kl_forward(x, v, i, tail, ign, None, 1.0, True, "mean", 255, 0.5, 1.0)[0].backward(seed)

    def method_call():
        x = s.detach().requires_grad_(True)
        with torch.autocast(args.device, enabled=False):
            method(SimpleNamespace(logits=x), batch).backward(seed)

    paths = {"topk_kl, eager (autograd function)": eager, "topk_kl, custom operators": custom_op,
             "the kl method, eager": method_call}
    if cuda:
        paths["the two launches alone (Triton's launcher)"] = launches_alone(s, v, i, tail, ign)[0]
    for fn in paths.values():
        for _ in range(20):
            fn()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    means = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            sync()
            means[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    med = {name: statistics.median(m) for name, m in means.items()}
    head = checkout_commit()
    launches = ("the two Triton launches replaced by no-ops" if not cuda else
                "real launches (the GPU's share of a call is a few µs: the host sets the pace), the queue drained "
                "once a round")
    lines = ["# Host time of one KD loss call" + (", launches mocked" if not cuda else f" on {device_name(dev)}") + "\n",
             f"Machine: {device_name(torch.device('cpu'))}" + (f", {device_name(dev)}" if cuda else "") +
             f". Commit {head}. Forward + backward of the loss on an 8×19×64×128 student (a top-4 cache grid), "
             f"{launches}; the kl method row calls the method with logits already at the grid (its teacher-aware "
             f"plumbing and the loss, on the Triton path as on a GPU). Median over {args.rounds} alternating rounds "
             f"of the mean of {args.calls} calls. Made by `python benchmarks/loss_host_overhead.py"
             + (" --device cuda" if cuda else "") + "`.\n",
             "| path | µs a call | min–max over rounds |", "|---|---|---|",
             *[f"| {name} | {med[name]:.0f} | {min(m):.0f}–{max(m):.0f} |" for name, m in means.items()],
             "",
             f"custom operators / eager = **{med['topk_kl, custom operators'] / med['topk_kl, eager (autograd function)']:.2f}**: "
             "why eager code takes the autograd function and only traced code the operators."]
    if cuda:
        lines += ["", "## Where the eager call's host time goes", "",
                  f"cProfile of {args.calls} eager calls, the 25 functions of the most own time (tottime, s):", "",
                  "```", profile(eager, args.calls), "```", "",
                  "The same calls, the 25 functions of the most time with their callees (cumtime, s):", "",
                  "```", profile(eager, args.calls, "cumulative"), "```"]
    slug = device_slug(dev)
    path = Path(args.results) / f"loss-host-overhead-{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def launches_alone(s, v, i, tail, ign):
    """(run, loss, gradient): ``run`` launches one forward + backward as ``triton_op`` does, on buffers
    made once (the loss and the gradient among them): Triton's launch path with none of kdcache's
    wrapper around it."""
    N, C, P = s.shape[0], s.shape[1], s[0, 0].numel()
    k = v.shape[1]
    sv = s.reshape(N, C, P)
    vv, iv, tv, gv = v.reshape(N, k, P), i.reshape(N, k, P), tail.reshape(N, P), ign.reshape(N, P).view(torch.uint8)
    stats = torch.empty((3, N * P), dtype=torch.float32, device=s.device)
    scales = torch.empty(2, dtype=torch.float32, device=s.device)
    out = torch.empty((), dtype=torch.float32, device=s.device)
    part = torch.empty((triton_kl.programs(N, C, P, k, s.element_size()), 4), dtype=torch.float32, device=s.device)
    ticket = torch.zeros(1, dtype=torch.int32, device=s.device)
    grad = torch.empty_like(sv)
    go = torch.ones((), device=s.device)
    common = dict(T=1.0, with_tail=True, lse1=False, ignore_index=255, kd_weight=0.5, ce_weight=1.0, reduction=0)

    def run():
        triton_kl.forward(sv, vv, iv, tv, gv, None, stats, part, ticket, out, scales, s_sp=1, **common)
        triton_kl.backward(go, sv, vv, iv, tv, gv, None, stats, scales, grad, s_sp=1, g_sp=1, **common)

    return run, out, grad.view_as(s)


def profile(fn, calls: int, sort: str = "tottime") -> str:
    """The 25 functions first by ``sort`` (pstats' ``tottime``: own time; ``cumulative``: with their callees)
    over ``calls`` calls of ``fn``, as pstats prints them."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort).print_stats(25)
    text = buf.getvalue()
    return text[text.index("ncalls"):].rstrip() if "ncalls" in text else text.rstrip()


if __name__ == "__main__":
    main()
