"""How long ``kdcache --help`` and ``kdcache --version`` take, as whole processes, and whether they import
torch (target: ≤ 0.5 s, no torch).

Each command runs ``--rounds`` times, interleaved with the others in a rotating order so that a noisy
machine's slow spells fall on all of them alike: an empty Python process (``python -c pass``, the
floor), ``kdcache --version``, ``kdcache --help``, and ``kdcache train-student --help`` (which imports
the command's module, and torch with it). Reported: each command's median and minimum wall time, and
each one's median ratio to ``kdcache --help`` measured in the same rounds; and, from one more run under
``python -X importtime``, whether ``torch`` was imported.

    python benchmarks/cli_startup.py [--rounds 15] [--out benchmarks/results/cli-startup-cpu.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdcache.core.runs import checkout_commit

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "kdcache --version": [sys.executable, "-m", "kdcache", "--version"],
    "kdcache --help": [sys.executable, "-m", "kdcache", "--help"],
    "kdcache train-student --help": [sys.executable, "-m", "kdcache", "train-student", "--help"],
}
REFERENCE = "kdcache --help"


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - t0


def imports_torch(cmd: list[str]) -> bool:
    """Whether the command's process imports torch (``-X importtime`` lists every module imported)."""
    r = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, cwd=REPO)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in r.stderr.splitlines())


def commit() -> str:
    """The checkout's commit (and whether it has uncommitted changes), for the results file."""
    head = checkout_commit(REPO)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cli-startup-cpu.md"))
    args = ap.parse_args()
    names = list(COMMANDS)
    for name in names:  # warm the file cache and the byte-compiled modules once
        wall(COMMANDS[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(wall(COMMANDS[name]))
    torch_in = {name: imports_torch(cmd) for name, cmd in COMMANDS.items()}
    ref = times[REFERENCE]
    lines = [
        "# `kdcache --help` and `--version`: start-up time",
        "",
        f"Machine: cpu: {cpu_name()}; Python {platform.python_version()}; run at {commit()}. "
        "`python benchmarks/cli_startup.py "
        f"--rounds {args.rounds}`: each command run {args.rounds} times as a whole process, the commands "
        "interleaved in a rotating order; the ratio is the median over rounds of each round's own ratio to "
        "`kdcache --help`. Target: `kdcache --help` ≤ 0.5 s, without importing torch.",
        "",
        "| command | median (s) | min (s) | × `kdcache --help` | imports torch |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], ref))
        lines.append(f"| `{name}` | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | {ratio:.2f} | "
                     f"{'yes' if torch_in[name] else 'no'} |")
    help_median = statistics.median(ref)
    lines += ["", f"`kdcache --help`: median {help_median:.3f} s "
                  f"({'meets' if help_median <= 0.5 and not torch_in[REFERENCE] else 'misses'} the target)."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
