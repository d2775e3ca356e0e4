"""Two versions of the fused kernels side by side: ``bench-kernels`` of a commit and of this checkout,
in alternating processes, round after round, and the speed-up of each case.

    python benchmarks/kernels_before_after.py --before COMMIT [--rounds 3] [--markdown FILE]

Each side is laid out as an installation would be (``checkout_site.py``; the commit from a
``git worktree``), with its own Numba cache, compiled in a first call that is not timed. Each round
runs ``kdcache bench-kernels --no-compile`` once per side, the order swapping from round to round,
so both meet the same machine; a case's time per side is the median over the rounds of each
round's median, and its speed-up the median over rounds of that round's before/after ratio. The
eager PyTorch column is the same code on both sides: its ratio, near 1, shows how much of a
difference the machine's noise alone makes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from checkout_site import lay_out

from kdcache.core.runs import checkout_commit, device_name

ROOT = Path(__file__).resolve().parent.parent


def bench(site: Path, out: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    subprocess.run([sys.executable, "-m", "kdcache", "bench-kernels", "--device", "cpu", "--no-compile",
                    "--repeats", str(repeats), "--json", str(out)], env=env, check=True, cwd=site,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the commit to compare this checkout against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="bench-kernels' timed repeats per backend")
    ap.add_argument("--markdown", help="write the table to this Markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = tmp / "before-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            sites = {"before": tmp / "before", "after": tmp / "after"}
            lay_out(sites["before"], tree)
            lay_out(sites["after"], ROOT)
            for side, site in sites.items():  # compile (or load) each side's kernels, untimed
                bench(site, tmp / f"warm-{side}.json", 1)
            rounds = []
            for r in range(args.rounds):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                rounds.append({side: bench(sites[side], tmp / f"{side}-{r}.json", args.repeats) for side in order})
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    table = report(rounds, args.before, checkout_commit(ROOT) or "this checkout")
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


def report(rounds: list[dict], before: str, after: str) -> str:
    first = rounds[0]["before"]
    lines = [f"# The CPU kernels before ({before}) and after ({after})", "",
             f"Machine: {device_name(__import__('torch').device('cpu'))}; student {first['dtype']}; made by "
             f"`python benchmarks/kernels_before_after.py --before {before}`: {len(rounds)} rounds, each running "
             "`bench-kernels --no-compile` once per side in alternating order. ms: the median over rounds; "
             "speed-up: the median over rounds of each round's before / after (min–max). Eager PyTorch is the same "
             "code on both sides: its ratio shows the machine's noise.", "",
             "| case | k | fused ms before | fused ms after | fused speed-up | eager ratio |", "|---|---|---|---|---|---|"]
    for i, case in enumerate(first["cases"]):
        def ms(side, key, i=i):
            return [r[side]["cases"][i]["ms"][key] for r in rounds]

        def ratio(key, ms=ms):
            xs = [b / a for b, a in zip(ms("before", key), ms("after", key))]
            return f"{statistics.median(xs):.2f}× ({min(xs):.2f}–{max(xs):.2f})"

        shape = "×".join(map(str, case["shape"]))
        lines.append(f"| {case['kind']} {shape} | {case['k']} | {statistics.median(ms('before', 'fused')):.2f} | "
                     f"{statistics.median(ms('after', 'fused')):.2f} | {ratio('fused')} | {ratio('eager')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
