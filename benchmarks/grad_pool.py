"""The CPU loss with and without its gradient pool, side by side in one process: ``bench-kernels``' CPU cases.

    python benchmarks/grad_pool.py [--repeats 20] [--markdown FILE]

``kernels/api.py`` writes gradients of ``GRAD_POOL_MIN_BYTES`` or more into a pooled buffer that an
earlier call's gradient no longer holds, instead of a fresh array whose pages the kernel must fault
in and the system zero. This times ``topk_kl``'s forward + backward (as ``bench-kernels`` calls it)
with the pool off (``GRAD_POOL_SIZE`` = 0: a fresh array each call) and on, call after call, the
order alternating; per case the median ms of each and the median over pairs of off / on, with its
interquartile range. Cases whose gradient is below the pool's size threshold run the same code both
ways: their ratios show the noise.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from numba_variants import alternate, emit

from kdcache.core.runs import checkout_commit, device_name
from kdcache.kernels import api, topk_kl
from kdcache.kernels.bench import CPU_ROWS, CPU_SEG, make_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed pairs of calls per case")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--markdown", help="write the table to this Markdown file")
    args = ap.parse_args()
    pool_size = api.GRAD_POOL_SIZE
    rows = []
    try:
        for N, C, spatial in CPU_SEG + CPU_ROWS:
            for k in (int(x) for x in args.ks.split(",")):
                s, v, i, tail = make_inputs(N, C, spatial, k, torch.float32, torch.device("cpu"))

                def fused(s=s, v=v, i=i, tail=tail):
                    x = s.detach().requires_grad_(True)
                    topk_kl(x, v, i, tail, temperature=2.0, check_inputs=False).backward()

                def side(size):
                    return lambda: setattr(api, "GRAD_POOL_SIZE", size)

                times = alternate({"off": side(0), "on": side(pool_size)}, fused, args.repeats)
                ratios = [a / b for a, b in zip(times["off"], times["on"])]
                q = statistics.quantiles(ratios, n=4)
                mb = N * C * (spatial[0] * spatial[1] if spatial else 1) * 4 / 2**20
                kind = "segmentation" if spatial else "rows"
                rows.append(f"| {kind} {'×'.join(map(str, (N, C, *spatial)))} | {k} | {mb:.1f} | "
                            f"{'yes' if mb * 2**20 >= api.GRAD_POOL_MIN_BYTES else 'no'} | "
                            f"{statistics.median(times['off']):.2f} | {statistics.median(times['on']):.2f} | "
                            f"**{statistics.median(ratios):.2f}×** | {q[0]:.2f}–{q[2]:.2f} |")
                print(rows[-1], flush=True)
    finally:
        api.GRAD_POOL_SIZE = pool_size
    lines = ["# The CPU loss with and without its gradient pool", "",
             f"Machine: {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads; commit "
             f"{checkout_commit() or 'unknown'}; student float32, teacher fp16 values, uint8/int32 ids, fp16 tail, "
             f"T = 2, the bench-kernels CPU cases. `topk_kl`'s forward + backward with the pool off (a fresh gradient "
             f"array each call) and on ({pool_size} buffers of {api.GRAD_POOL_MIN_BYTES >> 20} MB or more), "
             f"{args.repeats} pairs of calls a case in one process, the order alternating. ms: the median; off / on: "
             "the median over pairs (above 1: the pool faster), with the interquartile range. Made by "
             "`python benchmarks/grad_pool.py`.", "",
             "| case | k | gradient MB | pooled | off ms | on ms | off / on | middle half |",
             "|---|---|---|---|---|---|---|---|", *rows]
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
