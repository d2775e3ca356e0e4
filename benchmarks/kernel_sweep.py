"""The Triton loss's launch settings swept on a GPU: forward + backward per setting, side by side.

    python benchmarks/kernel_sweep.py            # on a CUDA machine; writes benchmarks/results/kernel-sweep-<gpu>.md

Maps (8×C×512×1024, bf16 student, top-4 + tail): the class loop (``LEAN``, with ``BITS`` at C ≤ 32,
against the class-by-class loop, alone and with ``CHUNK``: the forward's chunk maximum, then independent
exponentials), pixels a thread (``SPT``), ``num_warps`` and the classes whose loads go out before use
(``UNROLL``); rows (4096×C): ``BLOCK_C`` and ``num_warps``, with and without the lean loop (``LEAN``).
Each setting runs through ``kdcache.kernels.topk_kl`` (``triton_kl.MAP_TUNING`` / ``ROW_TUNING``),
timed as ``bench-kernels`` times it (CUDA events, L2 flushed before each call), in rounds that take
the settings in turn; medians. The defaults in ``kernels/triton_kl.py`` are marked; the table says
which setting was fastest per case. Settings are kernel speed only: every one computes the same loss.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch

from kdcache.core.runs import checkout_commit, device_name, device_slug
from kdcache.kernels import topk_kl, triton_kl
from kdcache.kernels.bench import (
    L2Flush,
    Spin,
    copy_bandwidth,
    cuda_time_ms,
    make_inputs,
    moved_bytes_cuda,
)

MAP_CASES = [(8, 11, (512, 1024)), (8, 19, (512, 1024)), (8, 150, (512, 1024))]
ROW_CASES = [(4096, 1000, ()), (4096, 32000, ()), (4096, 128000, ())]
# The lean class loops (LEAN, the forward's BITS at C <= 32; the default since 2026-11-28, 8 classes in flight)
# against the class-by-class loop (LEAN off, 4 in flight, alone and with CHUNK), the lean loop without bits and
# with the backward's bits too (BWD_BITS); then the lean loop's pixels a thread, warps and classes in flight
# around the default. 8 pixels a thread stay out: the four slowest settings in every maps case of the
# class-by-class loop's H200 sweeps (97214fa, 06cf5fe); 1 pixel a thread was slower at every setting in 59c0182's
MAP_SETTINGS = [dict(LEAN=False), dict(LEAN=False, CHUNK=True), dict(BITS=False), dict(BWD_BITS=True)]
MAP_SETTINGS += [dict(SPT=s, num_warps=w, UNROLL=u)
                 for s, w, u in ((2, 8, 8), (4, 4, 8), (2, 4, 4), (2, 8, 4), (4, 4, 4))]
ROW_SETTINGS = [dict(BLOCK_C=b, num_warps=w) for b, w in itertools.product((1024, 4096), (4, 16))]
# the rows' lean loop (ROW_LEAN, off by default until a GPU has timed it): fewer registers a thread, so
# more warps may pay
ROW_SETTINGS += [dict(LEAN=True, BLOCK_C=b, num_warps=w) for b, w in ((1024, 4), (1024, 8), (2048, 8), (4096, 16))]
# fewer warps a row: 4096×1000 is the one case slower than torch.compile (0.05 against 0.04 ms at 865e091), where
# each row's program pays cross-warp reductions and its ticket for one tile of 1000 classes
ROW_SETTINGS += [dict(BLOCK_C=1024, num_warps=w, LEAN=lean) for w in (1, 2) for lean in (False, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    flush = L2Flush(dev)
    spin = Spin(dev)
    copy = copy_bandwidth(dev)
    lines = [f"# Kernel launch settings on {device_name(dev)}\n",
             f"bf16 student, top-4 + tail; fused forward + backward, device time (each call queued behind a GPU spin, "
             f"`kernels/bench.py`), median ms of {args.repeats} rounds; copy rate in "
             f"the same run {copy:.0f} GB/s. Commit {checkout_commit() or 'unknown'}. Made by `python benchmarks/kernel_sweep.py`.\n"]
    slug = device_slug(dev)
    path = Path(args.results) / f"kernel-sweep-{slug}.md"
    for kind, cases, settings, attr in (("maps", MAP_CASES, MAP_SETTINGS, "MAP_TUNING"),
                                        ("rows", ROW_CASES, ROW_SETTINGS, "ROW_TUNING")):
        for N, C, sp in cases:
            part = sweep_case(kind, N, C, sp, settings, attr, dev, flush, spin, copy, args.repeats)
            print("\n".join(part), flush=True)
            lines += part
            path.write_text("\n".join(lines) + "\n")  # after each case: a time limit keeps what was measured
            torch.cuda.empty_cache()


def sweep_case(kind, N, C, sp, settings, attr, dev, flush, spin, copy, repeats) -> list[str]:
    """One case under every setting (None: the defaults), as table lines."""
    s, v, i, tail = make_inputs(N, C, sp, 4, torch.bfloat16, dev)
    moved = moved_bytes_cuda(s, v, i, tail)
    lines = []

    def run():
        x = s.detach().requires_grad_(True)
        topk_kl(x, v, i, tail, temperature=2.0, check_inputs=False).backward()

    ok = []
    for st in [None, *settings]:
        setattr(triton_kl, attr, st)
        try:
            run()
            run()
            torch.cuda.synchronize()
            ok.append(st)
        except Exception as exc:  # a setting the compiler refuses (too many registers…): reported
            lines.append(f"- {kind} {N}×{C}: {st} failed: {type(exc).__name__}: {str(exc)[:120]}")
    times = {repr(st): [] for st in ok}
    for _ in range(repeats):
        for st in ok:
            setattr(triton_kl, attr, st)
            times[repr(st)].append(cuda_time_ms(lambda: None, lambda _: run(), flush, spin)[0])
    setattr(triton_kl, attr, None)
    med = sorted((statistics.median(t), name) for name, t in times.items())
    shape = "×".join(map(str, [N, C, *sp]))
    lines += ["", f"## {kind} {shape}", "", "| setting | ms | % of copy on bytes moved |", "|---|---|---|"]
    for ms, name in med:
        label = "default" if name == "None" else name
        lines.append(f"| {label} | {ms:.3f} | {100 * moved / (ms * 1e-3) / 1e9 / copy:.0f}% |")
    return lines


if __name__ == "__main__":
    main()
